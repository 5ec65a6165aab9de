"""Multiply-adds counted the way the SegFormer / TransKD model zoo counts them.

The published "GFLOPs" of the public TransKD code (SegFormer-B0 13.67, SegFormer-B2
113.84, Cityscapes at 512x1024) are multiply-adds from mmcv 1.x's
``get_model_complexity_info`` (mmcv-full 1.3.10, pinned by the public code): forward
hooks on module types, each counting

- a convolution: output elements x (kernel height x width x input channels / groups),
  plus one per output element for its bias;
- a Linear: input elements x output features (its bias is not counted);
- a LayerNorm or BatchNorm: its elements, twice with an affine;
- a ReLU: its output elements;

and nothing else: not the attention's two matmuls (q k^T and attention x v, functional
in the public code), GELU, softmax, resizes (``F.interpolate``), additions or
concatenation. The public models count 20 classes (the public SegFormer class's
default); at 19 classes B0 is 13.67 and B2 113.82. The public decode head runs the
1x1 fusion conv after upsampling, on 4 x width channels at 1/4 resolution (63 % of B0's
count, 68 % of B2's); ours runs it before (transkd_jax/models/head.py), so the head is
counted in the public order, from its shapes. ``count`` applies the same rule to any
model whose parameter-holding modules it knows, and says so when it does not.
"""

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from transkd_jax.models.head import SegFormerHead
from transkd_jax.models.mit import DepthwiseConv3x3, PatchConv

NORMS = (nn.LayerNorm, nn.BatchNorm, nn.GroupNorm)
KNOWN = (SegFormerHead, nn.Dense, nn.Conv, DepthwiseConv3x3, PatchConv, *NORMS)


def _numel(x) -> int:
  return math.prod(x.shape)


def _segformer_head(head: SegFormerHead, features) -> int:
  """The public head: linear_c per stage, upsample, concat, linear_fuse conv (no bias),
  BatchNorm, ReLU, linear_pred conv (with bias); at 1/4 resolution from stage 1 on."""
  batch, height, width = features[0].shape[:3]
  pixels, d, k = batch * height * width, head.width, head.num_classes
  linear_c = sum(_numel(f) * d for f in features)
  return linear_c + pixels * (4 * d * d + 2 * d + d + d * k + k)


def _module_macs(module: nn.Module, args, out) -> int:
  """The mmcv rule for one call of ``module`` (one of ``KNOWN``)."""
  if isinstance(module, SegFormerHead):
    return _segformer_head(module, args[0])
  if isinstance(module, nn.Dense):
    return _numel(args[0]) * module.features
  if isinstance(module, nn.Conv):
    size = module.kernel_size
    size = (size,) * (out.ndim - 2) if isinstance(size, int) else tuple(size)
    per_output = math.prod(size) * args[0].shape[-1] // module.feature_group_count
    return _numel(out) * (per_output + int(module.use_bias))
  if isinstance(module, DepthwiseConv3x3):  # with a bias
    return _numel(out) * (9 + 1)
  if isinstance(module, PatchConv):  # kernel = stride = ratio, with a bias
    return _numel(out) * (module.ratio**2 * args[0].shape[-1] + 1)
  if isinstance(module, NORMS):
    return _numel(args[0]) * (2 if (module.use_scale or module.use_bias) else 1)
  raise TypeError(f"no multiply-add rule for {type(module).__name__}")


def count(model: nn.Module, image_size, batch: int = 1) -> Optional[int]:
  """Multiply-adds of one forward pass of ``model`` at ``batch`` x ``image_size`` by the
  model zoo's rule; None when a module holding parameters is one the rule does not
  know (its count would be missing). Abstract shapes only: cheap at any size."""
  images = jax.ShapeDtypeStruct((batch, *image_size, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  counted, total = [], [0]
  inside = []  # a known module is running: its submodules are part of its count

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if inside or context.method_name != "__call__" or not isinstance(module, KNOWN):
      return next_fun(*args, **kwargs)  # an unknown module's children are still seen
    inside.append(module)
    try:
      out = next_fun(*args, **kwargs)
    finally:
      inside.pop()
    counted.append(module.path)
    total[0] += _module_macs(module, args, out)
    return out

  def forward(v, x):
    with nn.intercept_methods(interceptor):
      return model.apply(v, x)

  jax.eval_shape(forward, variables, images)
  owners = {path[:-1] for path, _ in _param_paths(variables["params"])}
  known = set(counted)
  missing = [p for p in owners if not any(p[: len(k)] == k for k in known)]
  return None if missing else total[0]


def _param_paths(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _param_paths(value, (*prefix, key))
    else:
      yield (*prefix, key), value
