"""The benchmarks: each returns / prints its measurements for a tiny configured run, and
their command line names bad input in one line."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from runs import REPO, SYNTHETIC, env, overrides, tiny_config

from transkd_jax import throughput
from transkd_jax.bench.model import bench_model
from transkd_jax.bench.step import bench_step
from transkd_jax.errors import UserError
from transkd_jax.models import kernels


def test_step_times_the_configured_method():
  row = bench_step(tiny_config(method="student"), steps=1, warmup=1)
  assert row["method"] == "student" and (row["height"], row["width"]) == (64, 128)
  assert row["imgs_per_s"] > 0 and row["gflops_per_img"] > 0
  assert row["matmul_gflops_per_s"] > 0 and row["tflops_per_device"] > 0
  ratio = row["gflops_per_s"] / row["matmul_gflops_per_s"]
  assert row["fraction_of_matmul"] > 0 and abs(row["fraction_of_matmul"] - ratio) < 1e-2
  assert "mfu" not in row  # no published peak for a CPU


def test_the_step_profile_names_the_ops_of_teacher_student_and_losses():
  """``benchmark step --profile=N``: the N ops that took the most time in traced steps of
  the whole TransKD step, by module path, forward and backward."""
  row = bench_step(tiny_config(method="transkd_base"), steps=1, warmup=1, profile=10**6)
  ops = row["top_ops"]
  assert len(ops) > 50 and row["op_time_ms_per_step"] > 0
  assert [r["ms"] for r in ops] == sorted((r["ms"] for r in ops), reverse=True)
  assert sum(r["share"] for r in ops) == pytest.approx(1, abs=0.01)  # every op traced
  roots = {(r["pass"], r["where"].split("/")[0]) for r in ops}
  assert {("fwd", "teacher"), ("fwd", "student"), ("bwd", "student"), ("bwd", "fusion")} <= roots
  assert ("bwd", "teacher") not in roots  # frozen: no backward pass
  assert any(r["where"].startswith("student/encoder/block1_*/attn/") for r in ops)


def test_the_step_command_times_each_per_device_batch_in_one_process(compile_cache):
  """``benchmark step --per_device_batch_sizes=1,2``: a line each, with its ops named."""
  result = subprocess.run(
    [sys.executable, "-m", "transkd_jax.benchmark", "step", SYNTHETIC]
    + overrides("", image_size="(32,64)")
    + ["--per_device_batch_sizes=1,2", "--steps=1", "--profile=3"],
    cwd=REPO,
    env=env(compile_cache),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
  assert [(r["bench"], r["batch_size"], r["height"]) for r in rows] == [
    ("step", 1, 32),
    ("step", 2, 32),
  ]
  assert all(len(r["top_ops"]) == 3 and r["imgs_per_s"] > 0 for r in rows)


def test_the_model_benchmark_names_a_form_these_devices_lack():
  for form, lack in (("gpu", "needs NVIDIA GPUs"), ("tpu", "needs TPU devices")):
    with pytest.raises(UserError, match=f"--kernels=cpu,{form}: .*{lack}"):
      bench_model(tiny_config(), ["cpu", form], repeats=1)


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


def test_infer_runs_both_engines_on_the_same_pixels(tmp_path):
  """benchmark infer on a converted B0: both engines' label maps agree, each row has the
  latencies, memory and the CPU's name; bad sizes name the flag."""
  pytest.importorskip("onnxruntime")
  from flax import traverse_util

  from transkd_jax.bench.infer import bench_infer, parse_sizes
  from transkd_jax.models import SegFormer
  from transkd_jax.weights.record import save

  shapes = jax.eval_shape(SegFormer("b0", 3).init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  rng = np.random.default_rng(0)
  flat = {
    path: (1 + np.abs(x) if path[-1] in ("scale", "var") else x)
    for path, leaf in traverse_util.flatten_dict(shapes).items()
    for x in [rng.normal(scale=0.1, size=leaf.shape).astype(np.float32)]
  }
  save(traverse_util.unflatten_dict(flat), str(tmp_path / "b0"), {"num_classes": 3})
  (row,) = bench_infer(str(tmp_path / "b0"), parse_sizes("64x96"), batch=2, steps=2)
  assert row["model"] == "SegFormer-B0" and row["size"] == "64x96" and row["batch"] == 2
  assert row["labels_agree"] > 0.999
  for engine in ("jax", "onnxruntime"):
    stats = row[engine]
    assert 0 < stats["p50_ms"] <= stats["p90_ms"] and stats["img_per_s"] > 0
    assert stats["peak_rss_mib"] >= 0
  assert row["onnx_vs_jax"] > 0 and row["cpu"]
  with pytest.raises(UserError, match="--sizes: 64x100 is not two positive multiples of 32"):
    parse_sizes("64x100")
