"""The train-step benchmark (``python -m transkd_jax.benchmark step --config=...``).

Times the configured method's jitted, sharded train step on in-memory batches
(the teacher has random weights: speed does not depend on them), after a
compile and warm-up, each step waited for with ``block_until_ready``. Prints
one JSON line: imgs_per_s, step_ms_median, compile_s, peak_rss_mb,
device_peak_mb (GPU/TPU), gflops_per_img (XLA cost analysis of the whole step:
teacher forward, student forward and backward, optimiser), height, width,
batch_size, method, backend.
"""

import json
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from transkd_jax import sharding
from transkd_jax.distill import loss_settings
from transkd_jax.optim import make_optimizer
from transkd_jax.train import build_models
from transkd_jax.train_step import init_state, jit_train_step, make_train_step, state_shardings


def bench_step(config, steps: int = 5, warmup: int = 2) -> dict:
  models = build_models(config, restore=False)
  size = tuple(config.image_size)
  batch_size = int(config.batch_size)
  mesh = sharding.make_mesh(tuple(config.mesh_shape))
  optimizer, schedule = make_optimizer(config.optimizer, config.total_steps)
  init = lambda: init_state(models.model, optimizer, size, config.seed)  # noqa: E731
  shardings = state_shardings(jax.eval_shape(init), mesh, config.sharding)
  state = jax.jit(init, out_shardings=shardings)()
  teacher_vars, teacher_sharding = None, None
  if models.teacher is not None:
    teacher_vars = jax.jit(models.teacher.init)(jax.random.key(1),
                                                jnp.zeros((1, *size, 3), jnp.float32))
    teacher_sharding = sharding.tree_shardings(teacher_vars, mesh, config.sharding)
    teacher_vars = jax.device_put(teacher_vars, teacher_sharding)
  settings = loss_settings(models.method, config.distill)
  step = jit_train_step(
      make_train_step(models.model, models.teacher, models.method, settings, optimizer,
                      schedule, config.seed, config.get("class_weights") or None),
      mesh, shardings, teacher_sharding)
  rng = np.random.default_rng(0)
  batch = sharding.global_batch({
      "image": rng.uniform(size=(batch_size, *size, 3)).astype(np.float32),
      "label": rng.integers(0, config.num_classes,
                            size=(batch_size, size[0] // 4, size[1] // 4)).astype(np.int32)},
      mesh)

  start = time.perf_counter()
  compiled = step.lower(state, teacher_vars, batch).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
  for _ in range(warmup):
    state, metrics = compiled(state, teacher_vars, batch)
  jax.block_until_ready(state)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, teacher_vars, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  median = statistics.median(times)
  row = {"bench": "step", "method": config.method, "backend": jax.default_backend(),
         "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
         "height": size[0], "width": size[1], "batch_size": batch_size,
         "dtype": config.dtype, "teacher_dtype": config.get("teacher_dtype") or config.dtype,
         "imgs_per_s": round(batch_size / median, 3), "step_ms_median": round(1e3 * median, 2),
         "compile_s": round(compile_s, 2),
         "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
         "gflops_per_img": round(flops / 1e9 / batch_size, 2)}
  stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
  if stats and "peak_bytes_in_use" in stats:
    row["device_peak_mb"] = round(stats["peak_bytes_in_use"] / 2 ** 20, 1)
  return row


def main_step(config, steps: int):
  print(json.dumps(bench_step(config, steps=steps)), flush=True)
