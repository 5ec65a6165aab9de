"""Run by test_train.py in a subprocess with 8 CPU devices: the sharded train
step (data-parallel, and data x model with FSDP-style parameter sharding) gives
the same parameters as the same step on one device. Prints the max differences."""

import json
import sys

import jax
import ml_collections
import numpy as np

jax.config.update("jax_default_matmul_precision", "highest")

from transkd_jax import sharding  # noqa: E402
from transkd_jax.distill import Distiller, loss_settings  # noqa: E402
from transkd_jax.models import MiTVariant, SegFormer  # noqa: E402
from transkd_jax.optim import make_optimizer  # noqa: E402
from transkd_jax.train_step import (init_state, jit_train_step, make_train_step,  # noqa: E402
                                    state_shardings)

STUDENT = MiTVariant((8, 16, 24, 32), (1, 1, 1, 1), (1, 1, 1, 2), 32)
TEACHER = MiTVariant((16, 32, 48, 64), (1, 1, 1, 1), (1, 2, 2, 4), 32)


def run(mesh, rule, steps=2):
  method = "transkd_base"
  model = Distiller(method, STUDENT, TEACHER, num_classes=5)
  teacher = SegFormer(TEACHER, 5)
  # eps 1.0 keeps AdamW's update proportional to small gradients; with eps 1e-8 a
  # gradient that is float noise around 0 becomes a +-lr step, on one device or eight.
  opt = ml_collections.ConfigDict({"lr": 1e-3, "eps": 1.0, "weight_decay": 0.01,
                                   "grad_clip_norm": 1.0})
  optimizer, schedule = make_optimizer(opt, 10)
  settings = loss_settings(method, {"hcl_weight": 1.0, "pea_weights": (0.1, 0.1, 0.5, 1.0)})
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(8, 64, 64, 3)).astype(np.float32)
  labels = rng.integers(0, 5, size=(8, 16, 16)).astype(np.int32)
  t_vars = jax.jit(teacher.init)(jax.random.key(1), images[:1])
  init = lambda: init_state(model, optimizer, (64, 64), 0)  # noqa: E731
  shardings = state_shardings(jax.eval_shape(init), mesh, rule)
  state = jax.jit(init, out_shardings=shardings)()
  t_shard = sharding.tree_shardings(t_vars, mesh, rule)
  step = jit_train_step(make_train_step(model, teacher, method, settings, optimizer, schedule, 0),
                        mesh, shardings, t_shard)
  t_vars = jax.device_put(t_vars, t_shard)
  losses = []
  for _ in range(steps):
    batch = sharding.global_batch({"image": images, "label": labels}, mesh)
    state, metrics = step(state, t_vars, batch)
    losses.append(float(metrics["loss"]))
  kernel = state.params["student"]["encoder"]["block4_0"]["mlp"]["fc1"]["kernel"]
  return jax.device_get(state.params), losses, str(kernel.sharding.spec)


def main():
  sharding.FSDP_MIN_SIZE = 1024  # so the tiny model's larger kernels really get split
  devices = jax.devices()
  assert len(devices) == 8, devices
  single, single_losses, _ = run(sharding.make_mesh((1, 1), devices[:1]), "replicate")
  out = {"losses": single_losses}
  for name, shape, rule in (("dp", (-1, 1), "replicate"), ("fsdp", (4, 2), "fsdp")):
    params, losses, spec = run(sharding.make_mesh(shape), rule)
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params,
                                         single))
    out[name] = {"max_param_diff": max(diffs), "losses": losses, "fc1_spec": spec}
  print(json.dumps(out))


if __name__ == "__main__":
  sys.exit(main())
