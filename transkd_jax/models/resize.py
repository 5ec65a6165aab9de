"""Resizing that matches PyTorch's ``F.interpolate`` exactly.

``jax.image.resize`` uses half-pixel centres for "nearest" (PyTorch floors) and
antialiases when it downsamples (PyTorch does not), so checkpoints trained in
PyTorch would see slightly different maps. These functions follow PyTorch's
rules. Both are separable: per axis, each output row is a fixed combination of
at most two source rows (``bilinear_taps`` / ``nearest_indices``), computed by
gathering the rows and blending them (a few FLOPs per element, unlike a dense
interpolation matmul, which is slower on XLA:CPU and inflates XLA's FLOP counts).

The gradient is the transposed (adjoint) interpolation. JAX would derive it
as a scatter-add, which XLA:CPU runs far slower than the forward pass; a
``custom_vjp`` computes it instead as a gather too: every source row
collects its (statically known, at most a few) output rows with their
weights. Same function, same gradient (tests compare both with the dense
``bilinear_matrix`` and its transpose).

That is the ``"cpu"`` form. The ``"native"``
form, for GPU and TPU, which run gathers and scatters poorly and matmuls well,
contracts each axis with the dense interpolation matrix, as ``jax.image``
does, at full float32 precision, and lets autodiff transpose it; nearest
upsampling by a whole factor is a ``repeat``. Integer maps (labels) are
gathered in both forms.

The rules (``bilinear_taps``, ``nearest_indices``, their matrices, ``adjoint_taps``)
and the per-axis interpolation in its two forms (``interpolate_axis``) live in
transkd_jax/models/kernels.py with the other two-form ops; this module resizes
NHWC maps with them and keeps their names importable.
"""

import functools
import operator

import jax.numpy as jnp
import numpy as np

from transkd_jax.models.kernels import (  # noqa: F401 (the rules' names stay importable here)
  adjoint_taps,
  bilinear_matrix,
  bilinear_taps,
  check_form,
  contract_axis,
  interpolate_axis,
  nearest_indices,
  nearest_matrix,
)


def _resize(x, size, mode, kernels):
  check_form(kernels)
  for axis, out_size in ((1, size[0]), (2, size[1])):
    if x.shape[axis] != out_size:
      x = interpolate_axis(x, axis, int(out_size), mode, kernels)
  return x


def resize_bilinear(x: jnp.ndarray, size, kernels: str = "native") -> jnp.ndarray:
  """Resizes an NHWC map to ``size`` = (height, width) like PyTorch bilinear."""
  return _resize(x, size, "bilinear", kernels)


def resize_nearest(x: jnp.ndarray, size, kernels: str = "native") -> jnp.ndarray:
  """Resizes an NHWC (or NHW) array to ``size`` like PyTorch "nearest"."""
  return _resize(x, size, "nearest", kernels)


def resize_bilinear_sum(maps, size, kernels: str = "native") -> jnp.ndarray:
  """``sum(resize_bilinear(m, size, kernels) for m in maps)`` for NHWC maps of one batch
  and channel count (the SegFormer head's upsampled stage maps).

  ``cpu``: exactly that. ``native``: each map's height is resized alone, then one
  contraction along the width takes every map at once (their widths side by side, the
  interpolation matrices likewise), so the sum is written once instead of one full-size
  map per stage and a sum per addition: the same sums of products, added in another order.
  Maps already at ``size`` are added afterwards.
  """
  check_form(kernels)
  at_size = [m for m in maps if m.shape[1:3] == tuple(size)]
  resized = [m for m in maps if m.shape[1:3] != tuple(size)]
  if kernels == "cpu" or len(resized) < 2:
    return functools.reduce(operator.add, (resize_bilinear(m, size, kernels) for m in maps))
  rows = [_resize(m, (size[0], m.shape[2]), "bilinear", kernels) for m in resized]
  matrix = np.concatenate([bilinear_matrix(m.shape[2], size[1]) for m in resized], axis=1)
  total = contract_axis(matrix, jnp.concatenate(rows, axis=2), 2)
  return functools.reduce(operator.add, at_size, total)
