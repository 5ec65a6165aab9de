"""The benchmarks: each returns / prints its measurements for a tiny configured run, and
their command line names bad input in one line."""

import subprocess
import sys

from transkd_jax.bench.step import bench_step

from runs import REPO, SYNTHETIC, tiny_config


def test_step_times_the_configured_method():
  row = bench_step(tiny_config(method="student"), steps=1, warmup=1)
  assert row["method"] == "student" and (row["height"], row["width"]) == (64, 128)
  assert row["imgs_per_s"] > 0 and row["gflops_per_img"] > 0


def test_a_bad_subcommand_or_config_is_one_line():
  result = subprocess.run([sys.executable, "-m", "transkd_jax.benchmark", "nope", SYNTHETIC],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0 and "step|data|eval|model" in result.stderr
  result = subprocess.run([sys.executable, "-m", "transkd_jax.benchmark", "step", SYNTHETIC,
                           "--config.batch_size=0"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 2 and "config.batch_size must be a positive integer" in result.stderr
