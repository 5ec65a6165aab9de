"""``benchmark step``: the configured method's jitted, sharded train step.

Built by ``build.training(config, weights=False)`` (random teacher weights:
speed does not depend on them) and run on in-memory batches after a compile
and warm-up, each step waited for with ``block_until_ready``. One JSON line:
imgs_per_s, step_ms_median, compile_s, peak_rss_mb, device_peak_mb (GPU/TPU),
gflops_per_img (XLA's cost analysis of the whole step: teacher forward,
student forward and backward, optimiser), height, width, batch_size, method,
backend.
"""

import resource
import statistics
import time

import jax
import numpy as np

from transkd_jax import build, sharding


def bench_step(config, steps: int = 5, warmup: int = 2) -> dict:
  run = build.training(config, weights=False)
  size = tuple(config.image_size)
  batch_size = config.batch_size
  state = run.new_state()
  teacher_variables = run.random_teacher()
  rng = np.random.default_rng(0)
  spec = build.batch_spec(config)  # the shapes the data pipeline gives for config.data
  batch = sharding.global_batch({
      "image": rng.integers(0, 256, size=spec["image"].shape).astype(np.uint8),
      "label": rng.integers(0, config.num_classes, size=spec["label"].shape).astype(np.int32)},
      run.mesh)

  start = time.perf_counter()
  compiled = run.train_step.lower(state, teacher_variables, batch).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
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
  row = {"bench": "step", "method": config.method, "backend": jax.default_backend(),
         "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
         "height": size[0], "width": size[1], "batch_size": batch_size,
         "dtype": config.dtype, "teacher_dtype": config.teacher_dtype or config.dtype,
         "imgs_per_s": round(batch_size / median, 3), "step_ms_median": round(1e3 * median, 2),
         "compile_s": round(compile_s, 2),
         "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
         "gflops_per_img": round(flops / 1e9 / batch_size, 2)}
  stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
  if stats and "peak_bytes_in_use" in stats:
    row["device_peak_mb"] = round(stats["peak_bytes_in_use"] / 2 ** 20, 1)
  return row
