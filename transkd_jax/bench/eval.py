"""``benchmark eval``: the evaluation step, under both protocols.

Times the jitted evaluation step that ``--mode=eval`` and validation run
(``eval_step.make_eval_step``: forward, logits resized to the labels, confusion
matrix) on in-memory batches of the configured model (the student; see
``config.eval.variant``) at ``config.image_size``, after a warm-up call, with
``block_until_ready``. Labels are at twice the input size under the
``standard`` protocol (Cityscapes' 1024x2048 for 512x1024 inputs) and at a
quarter under ``reference``. Prints one JSON line per protocol.
"""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from transkd_jax import build, sharding


def bench_eval(config, protocol: str, steps: int = 5) -> dict:
  h, w = tuple(config.image_size)
  batch = int(config.batch_size)
  model = build.deployed_model(config)
  mesh = build.mesh_of(config)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, h, w, 3)))
  variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
  label_size = (2 * h, 2 * w) if protocol == "standard" else (h // 4, w // 4)
  rng = np.random.default_rng(0)
  local = {
    "image": rng.integers(0, 256, size=(batch, h, w, 3)).astype(np.uint8),
    "label": rng.integers(0, config.num_classes, (batch,) + label_size).astype(np.int32),
    "valid": np.ones(batch, bool),
  }
  inputs = sharding.global_batch(local, mesh)
  step = build.make_eval_step(config, mesh, protocol)
  start = time.perf_counter()
  jax.block_until_ready(step(variables, inputs))
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(step(variables, inputs))
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  return {
    "bench": "eval",
    "variant": str(model.variant),
    "protocol": protocol,
    "imgs_per_s": round(batch / median, 3),
    "step_ms_median": round(1000 * median, 1),
    "compile_s": round(compile_s, 1),
    "height": h,
    "width": w,
    "label_size": list(label_size),
    "batch_size": batch,
    "dtype": config.dtype,
    "device": jax.devices()[0].device_kind,
  }
