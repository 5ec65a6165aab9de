"""Run by test_train_step.py in a subprocess with 8 CPU devices: the sharded train
step (data x model: data-parallel with FSDP-style parameter sharding), built by
``build.training`` as training builds it, gives the same parameters as the same step
on one device. Prints the max differences."""

import json
import sys

import jax
import numpy as np

jax.config.update("jax_default_matmul_precision", "highest")

from runs import tiny_config  # noqa: E402

from transkd_jax import build, sharding  # noqa: E402


def run(mesh_shape, rule, devices, steps=2):
  # The student alone: the teacher and the distillation modules shard by the same rules
  # (test_bench_compile checks a TransKD-Base step under FSDP gathers them and never the batch).
  config = tiny_config(
    method="student",
    num_classes=5,
    image_size=(64, 64),
    batch_size=8,
    total_steps=10,
    mesh_shape=mesh_shape,
    sharding=rule,
  )
  # eps 1.0 keeps AdamW's update proportional to small gradients; with eps 1e-8 a
  # gradient that is float noise around 0 becomes a +-lr step, on one device or eight.
  config.optimizer.update(lr=1e-3, eps=1.0, weight_decay=0.01, grad_clip_norm=1.0)
  training = build.training(config, weights=False, devices=devices)
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(8, 64, 64, 3)).astype(np.float32)
  labels = rng.integers(0, 5, size=(8, 16, 16)).astype(np.int32)
  state = training.new_state()
  teacher_variables = training.teacher_variables(random=True)
  losses = []
  for _ in range(steps):
    batch = sharding.global_batch({"image": images, "label": labels}, training.mesh)
    state, metrics = training.train_step(state, teacher_variables, batch)
    losses.append(float(metrics["loss"]))
  kernel = state.params["student"]["encoder"]["block4_0"]["mlp"]["fc1"]["kernel"]
  return jax.device_get(state.params), losses, str(kernel.sharding.spec)


def main():
  sharding.FSDP_MIN_SIZE = 1024  # so the tiny model's larger kernels really get split
  devices = jax.devices()
  assert len(devices) == 8, devices
  single, single_losses, _ = run((1, 1), "replicate", devices[:1])
  out = {"losses": single_losses}
  # data x model: the batch split 4 ways, large parameters and their state 2 ways.
  for name, shape, rule in (("fsdp", (4, 2), "fsdp"),):
    params, losses, spec = run(shape, rule, devices)
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params, single))
    out[name] = {"max_param_diff": max(diffs), "losses": losses, "fc1_spec": spec}
  print(json.dumps(out))


if __name__ == "__main__":
  sys.exit(main())
