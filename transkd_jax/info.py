"""Model sizes without running anything: parameters and XLA-counted GFLOPs."""

import math

import jax
import jax.numpy as jnp

from transkd_jax.models import SegFormer

FLOPS_NOTE = ("GFLOPs from XLA's cost analysis of one image's forward pass: FLOPs, i.e. "
              "about 2 x multiply-adds; the model zoo's numbers (113.84 for B2, 13.67 for B0) "
              "count multiply-adds and leave some ops out")


def count_params(tree) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def model_info(model: SegFormer, image_size, method=None) -> dict:
  """{"params", "gflops"} of ``model`` at one image of ``image_size`` (h, w).

  Uses only abstract shapes (``jax.eval_shape``) and the lowered, uncompiled
  computation, so it is cheap even for B5 at full resolution.
  """
  images = jax.ShapeDtypeStruct((1, *image_size, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  forward = jax.jit(lambda v, x: model.apply(v, x, method=method))
  cost = forward.lower(variables, images).cost_analysis()
  flops = float(cost["flops"]) if cost and "flops" in cost else float("nan")
  return {"params": count_params(variables["params"]), "gflops": round(flops / 1e9, 3)}
