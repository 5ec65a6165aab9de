"""``benchmark step``: the configured method's jitted, sharded train step.

Built by ``build.training(config, weights=False)`` (random teacher weights:
speed does not depend on them) and run on in-memory uint8 batches after a
compile and warm-up, each step waited for with ``block_until_ready``. One JSON
line:

- imgs_per_s, step_ms_median, compile_s, peak_rss_mb, device_peak_mb (GPU/TPU);
- gflops_per_img: XLA's count for the whole step (teacher forward, student
  forward and backward, optimiser; ``throughput.step_flops``);
- gflops_per_s: that work per second, over all devices; matmul_gflops_per_s: a
  plain matmul of ``config.dtype`` timed in the same process on the same
  devices (2048^3 on CPU, 8192^3 on accelerators); fraction_of_matmul: their
  ratio, how close the step comes to the machine's own matmul rate;
- tflops_per_device, and mfu where the device's peak is known
  (``throughput.CHIPS``, dense bfloat16);
- huge_pages: whether the process runs with glibc's huge-page tunable
  (transkd_jax/hugepages.py; ``python -m transkd_jax.benchmark`` sets it);
- with ``--profile=N``: top_ops, the N ops of the whole step (teacher, student forward
  and backward, losses, optimiser) that took the most time in three traced steps
  (``jax.profiler``), each with its pass, module path, ms per step and share, and
  op_time_ms_per_step, the time of every op traced (``bench.model.profile_ops``).
"""

import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from transkd_jax import build, hugepages, sharding, throughput
from transkd_jax.bench.model import median_seconds, profile_ops


def matmul_gflops_per_s(dtype, devices) -> float:
  """GFLOP/s of a square matmul of ``dtype``, on every device (data-parallel)."""
  n = 2048 if devices[0].platform == "cpu" else 8192
  mesh = jax.sharding.Mesh(np.array(devices), ("d",))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
  a = jax.device_put(
    np.random.default_rng(0).standard_normal((len(devices), n, n), np.float32).astype(dtype), spec
  )
  seconds = median_seconds(jax.jit(lambda x: x @ x), a, repeats=3)
  return 2 * n**3 * len(devices) / seconds / 1e9


def bench_step(config, steps: int = 5, warmup: int = 2, profile: int = 0) -> dict:
  run = build.training(config, weights=False)
  size = tuple(config.image_size)
  batch_size = config.batch_size
  state = run.new_state()
  teacher_variables = run.teacher_variables(random=True)
  rng = np.random.default_rng(0)
  spec = build.batch_spec(config)  # the shapes the data pipeline gives for config.data
  batch = sharding.global_batch(
    {
      "image": rng.integers(0, 256, size=spec["image"].shape).astype(np.uint8),
      "label": rng.integers(0, config.num_classes, size=spec["label"].shape).astype(np.int32),
    },
    run.mesh,
  )

  start = time.perf_counter()
  compiled = run.train_step.lower(state, teacher_variables, batch).compile()
  compile_s = time.perf_counter() - start
  flops = throughput.step_flops(run.train_step, state, teacher_variables, batch, compiled=compiled)
  for _ in range(warmup):
    state, metrics = compiled(state, teacher_variables, batch)
  jax.block_until_ready(state)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, teacher_variables, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  median = statistics.median(times)
  devices = list(run.mesh.devices.flat)
  matmul = matmul_gflops_per_s(jnp.dtype(config.dtype), devices)
  rates = throughput.rates(flops, median, devices)
  row = {
    "bench": "step",
    "method": config.method,
    "backend": jax.default_backend(),
    "device": devices[0].device_kind,
    "devices": len(devices),
    "height": size[0],
    "width": size[1],
    "batch_size": batch_size,
    "dtype": config.dtype,
    "teacher_dtype": config.teacher_dtype or config.dtype,
    "kernels": run.kernels,
    "huge_pages": hugepages.enabled(),
    "imgs_per_s": round(batch_size / median, 3),
    "step_ms_median": round(1e3 * median, 2),
    "compile_s": round(compile_s, 2),
    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    "gflops_per_img": round(flops / 1e9 / batch_size, 2),
    "gflops_per_s": round(flops / median / 1e9, 1),
    "matmul_gflops_per_s": round(matmul, 1),
    "fraction_of_matmul": round(flops / median / 1e9 / matmul, 3),
    "tflops_per_device": round(rates["tflops_per_device"], 4),
  }
  if "mfu" in rates:
    row["mfu"] = round(rates["mfu"], 4)
  stats = devices[0].memory_stats() if devices[0].platform != "cpu" else None
  if stats and "peak_bytes_in_use" in stats:
    row["device_peak_mb"] = round(stats["peak_bytes_in_use"] / 2**20, 1)
  if profile:

    def run_once():
      nonlocal state
      state, metrics = compiled(state, teacher_variables, batch)  # the state is donated
      jax.block_until_ready((state, metrics))

    teacher_and_student = {"Distiller": "", "SegFormer": "teacher/"}  # the op_names' roots
    ops, total = profile_ops(compiled, run_once, profile, roots=teacher_and_student)
    row["op_time_ms_per_step"] = round(total, 2)
    row["top_ops"] = ops
  return row
