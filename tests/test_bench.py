"""The benchmarks' command line: each prints its JSON lines for a tiny configured run."""

import json
import subprocess
import sys

from runs import REPO, SYNTHETIC

TINY = ["--config.image_size=(64,128)", "--config.batch_size=2", "--config.teacher.variant=b0"]


def _bench(*args):
  result = subprocess.run([sys.executable, "-m", "transkd_jax.benchmark", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_step_times_the_configured_method():
  (row,) = _bench("step", SYNTHETIC, *TINY, "--config.method=transkd_base", "--steps=1")
  assert row["method"] == "transkd_base" and (row["height"], row["width"]) == (64, 128)
  assert row["imgs_per_s"] > 0 and row["gflops_per_img"] > 0


def test_model_takes_sizes_and_variants_from_the_config():
  rows = _bench("model", SYNTHETIC, *TINY, "--config.student.variant=b0", "--dwconv=auto",
                "--steps=1")
  assert [(r["size"], r["teacher"], r["dwconv"]) for r in rows] == [([64, 128], "b0", "auto")]
  assert rows[0]["student_fwd_bwd_s"] > 0


def test_a_bad_subcommand_or_config_is_one_line():
  result = subprocess.run([sys.executable, "-m", "transkd_jax.benchmark", "nope", SYNTHETIC],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0 and "step|data|eval|model" in result.stderr
  result = subprocess.run([sys.executable, "-m", "transkd_jax.benchmark", "step", SYNTHETIC,
                           "--config.batch_size=0"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 2 and "config.batch_size must be a positive integer" in result.stderr
