"""Model sizes without running anything: parameters and XLA-counted GFLOPs; ``--mode=info``."""

import math

import jax
import jax.numpy as jnp

from transkd_jax import build, macs, storage
from transkd_jax.models import archs, kernels

FLOPS_NOTE = (
  "GFLOPs from XLA's cost analysis of one image's forward pass: FLOPs, i.e. "
  "about 2 x multiply-adds, of everything the model computes, in our head's order; "
  "zoo GMACs: multiply-adds as the SegFormer / TransKD model zoo counts them "
  "(mmcv's rule: convolutions, linears, norms; not the attention matmuls; the public "
  "head's order), which gives its 113.84 (B2) and 13.67 (B0) at 512x1024 and 20 classes "
  "(transkd_jax/macs.py)"
)


def count_params(tree) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def model_info(model, image_size, method=None) -> dict:
  """{"params", "gflops"} of ``model`` at one image of ``image_size`` (h, w).

  Uses only abstract shapes (``jax.eval_shape``) and the lowered, uncompiled
  computation, so it is cheap even for B5 at full resolution. Counted with the
  CPU kernel forms, attention unchunked (XLA counts a loop's body once): the native
  resize's interpolation-matrix contractions (transkd_jax/models/kernels.py) would add
  FLOPs the model itself does not need.
  """
  model = model.clone(kernels="cpu")
  images = jax.ShapeDtypeStruct((1, *image_size, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  forward = jax.jit(lambda v, x: model.apply(v, x, method=method))
  with kernels.unchunked():  # XLA counts a loop's body once: attention in one chunk
    cost = forward.lower(variables, images).cost_analysis()
  flops = float(cost["flops"]) if cost and "flops" in cost else float("nan")
  return {"params": count_params(variables["params"]), "gflops": round(flops / 1e9, 3)}


def run_info(config, workdir: str) -> dict:
  """``--mode=info``: prints and writes WORKDIR/info.json (params and GFLOPs of the models)."""
  size = tuple(config.image_size)
  info = {}
  for role in ("teacher", "student"):
    arch, variant = config[role].arch, config[role].variant
    model = archs.build(arch, variant, config.num_classes, dtype=jnp.dtype(config.dtype))
    zoo = macs.count(model, size)
    info[role] = {
      "arch": arch,
      "variant": str(variant),
      "model": archs.model_name(arch, variant),
      **model_info(model, size),
      "zoo_gmacs": None if zoo is None else round(zoo / 1e9, 3),
    }
  info["reduction"] = {  # teacher -> student, the paper's "> 85 %"
    key: None
    if info["teacher"][key] is None or info["student"][key] is None
    else round(1 - info["student"][key] / info["teacher"][key], 4)
    for key in ("params", "gflops", "zoo_gmacs")
  }
  method = build.method_of(config)
  info["distiller"] = {
    "method": method.name,
    "description": method.description,
    **model_info(build.distiller(config), size),
  }
  info["input_size"] = list(size)
  info["note"] = FLOPS_NOTE
  print(f"input {size[0]}x{size[1]}, {config.num_classes} classes")
  for role in ("teacher", "student"):
    row = info[role]
    zoo = "n/a" if row["zoo_gmacs"] is None else f"{row['zoo_gmacs']:.2f}"
    print(
      f"  {role:8s} {row['model']}: {row['params']:,} parameters, {row['gflops']:.2f} GFLOPs, "
      f"{zoo} zoo GMACs"
    )
  cut = {k: "n/a" if v is None else f"{100 * v:.1f} %" for k, v in info["reduction"].items()}
  print(
    f"  {info['teacher']['model']} -> {info['student']['model']}: {cut['params']} fewer "
    f"parameters, {cut['gflops']} fewer GFLOPs, {cut['zoo_gmacs']} fewer zoo GMACs"
  )
  row = info["distiller"]
  print(
    f"  training-time model ({row['method']}: {row['description']}): "
    f"{row['params']:,} parameters, {row['gflops']:.2f} GFLOPs"
  )
  print(f"  ({FLOPS_NOTE})")
  if jax.process_index() == 0:
    path = storage.join(workdir, "info.json")
    storage.write_json(path, info, indent=2)
    print(f"wrote {path}")
  return info
