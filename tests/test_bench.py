"""The benchmarks: each returns / prints its measurements for a tiny configured run, and
their command line names bad input in one line."""

import subprocess
import sys

import jax
import jax.numpy as jnp
from runs import REPO, SYNTHETIC, tiny_config

from transkd_jax import throughput
from transkd_jax.bench.step import bench_step
from transkd_jax.models import kernels


def test_step_times_the_configured_method():
  row = bench_step(tiny_config(method="student"), steps=1, warmup=1)
  assert row["method"] == "student" and (row["height"], row["width"]) == (64, 128)
  assert row["imgs_per_s"] > 0 and row["gflops_per_img"] > 0
  assert row["matmul_gflops_per_s"] > 0 and row["tflops_per_device"] > 0
  ratio = row["gflops_per_s"] / row["matmul_gflops_per_s"]
  assert row["fraction_of_matmul"] > 0 and abs(row["fraction_of_matmul"] - ratio) < 1e-2
  assert "mfu" not in row  # no published peak for a CPU


def test_flops_count_every_attention_chunk(monkeypatch):
  """XLA counts a loop's body once: the count is taken on the attention in one chunk."""
  monkeypatch.setattr(kernels, "_CHUNK_ELEMENTS", 2 * 64 * 16)  # 16 chunks of 64 queries
  b, t, s, n, h = 2, 1024, 64, 1, 32
  q, k, v = (jax.ShapeDtypeStruct((b, x, n, h), jnp.float32) for x in (t, s, s))
  fn = jax.jit(kernels.softmax_attention)
  matmuls = 2 * (2 * b * t * s * n * h)  # q k^T and p v
  looped = fn.lower(q, k, v).cost_analysis()["flops"]
  counted = throughput.step_flops(fn, q, k, v)
  assert looped < matmuls / 8 < matmuls <= counted < 1.2 * matmuls
  grads = jax.jit(jax.grad(lambda *a: kernels.softmax_attention(*a).sum(), argnums=(0, 1, 2)))
  assert 2 * matmuls <= throughput.step_flops(grads, q, k, v) < 4 * matmuls


def test_rates_use_the_device_peak():
  class Device:
    device_kind = "NVIDIA H100 80GB HBM3"

  rates = throughput.rates(2 * 989e12, 1.0, [Device(), Device()])
  assert rates["tflops_per_device"] == 989 and rates["mfu"] == 1.0


def test_a_bad_subcommand_or_config_is_one_line():
  result = subprocess.run(
    [sys.executable, "-m", "transkd_jax.benchmark", "nope", SYNTHETIC],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode != 0 and "step|data|eval|model" in result.stderr
  result = subprocess.run(
    [sys.executable, "-m", "transkd_jax.benchmark", "step", SYNTHETIC, "--config.batch_size=-1"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 2
  assert "config.batch_size must be a non-negative integer" in result.stderr


def test_peak_memory_counts_the_worker_processes():
  """benchmark data's peak_host_mb sums this process and its children (grain's workers)."""
  from transkd_jax.bench.data import PeakMemory, tree_rss_mb

  before = tree_rss_mb()
  child = subprocess.Popen(
    [
      sys.executable,
      "-c",
      "import sys, time; x = bytearray(300 << 20); "
      "x[::4096] = b'1' * len(x[::4096]); print(1, flush=True); "
      "time.sleep(30)",
    ],
    stdout=subprocess.PIPE,
  )
  try:
    with PeakMemory(every_s=0.01) as memory:
      child.stdout.readline()  # the child holds its 300 MB now
  finally:
    child.kill()
    child.wait()
  assert memory.peak_mb - before > 250
