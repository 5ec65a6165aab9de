"""Resizing that matches PyTorch's ``F.interpolate`` exactly.

``jax.image.resize`` uses half-pixel centres for "nearest" (PyTorch floors) and
antialiases when it downsamples (PyTorch does not), so checkpoints trained in
PyTorch would see slightly different maps. These functions follow PyTorch's
rules. Bilinear is separable: per axis, gather the two source rows and blend
them (a few FLOPs per element, unlike a dense interpolation matmul, which
would also inflate XLA's FLOP counts).
"""

import functools

import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=None)
def bilinear_taps(in_size: int, out_size: int):
  """PyTorch bilinear, align_corners=False: (lo, hi, frac) per output index.

  src = (dst + 0.5) * in / out - 0.5, clamped at 0; out = x[lo] * (1 - frac) + x[hi] * frac.
  """
  scale = in_size / out_size
  dst = np.arange(out_size, dtype=np.float64)
  src = np.maximum((dst + 0.5) * scale - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  return lo, hi, (src - lo).astype(np.float32)


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """The same interpolation as an (out_size, in_size) matrix (for tests and reading)."""
  lo, hi, frac = bilinear_taps(in_size, out_size)
  weights = np.zeros((out_size, in_size), np.float64)
  np.add.at(weights, (np.arange(out_size), lo), 1.0 - frac)
  np.add.at(weights, (np.arange(out_size), hi), frac)
  return weights.astype(np.float32)


@functools.lru_cache(maxsize=None)
def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source index of each output index under PyTorch's "nearest" rule."""
  scale = in_size / out_size
  src = np.floor(np.arange(out_size, dtype=np.float64) * scale).astype(np.int64)
  return np.minimum(src, in_size - 1)


def resize_bilinear(x: jnp.ndarray, size) -> jnp.ndarray:
  """Resizes an NHWC map to ``size`` = (height, width) like PyTorch bilinear."""
  for axis, out_size in ((1, size[0]), (2, size[1])):
    if x.shape[axis] != out_size:
      lo, hi, frac = bilinear_taps(x.shape[axis], out_size)
      frac = jnp.asarray(frac, x.dtype).reshape((-1,) + (1,) * (x.ndim - axis - 1))
      x = jnp.take(x, lo, axis=axis) * (1 - frac) + jnp.take(x, hi, axis=axis) * frac
  return x


def resize_nearest(x: jnp.ndarray, size) -> jnp.ndarray:
  """Resizes an NHWC (or NHW) array to ``size`` like PyTorch "nearest"."""
  height, width = size
  if x.shape[1:3] == (height, width):
    return x
  x = jnp.take(x, nearest_indices(x.shape[1], height), axis=1)
  return jnp.take(x, nearest_indices(x.shape[2], width), axis=2)
