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

That is the ``"cpu"`` form (transkd_jax/models/kernels.py). The ``"native"``
form, for GPU and TPU, which run gathers and scatters poorly and matmuls well,
contracts each axis with the dense interpolation matrix, as ``jax.image``
does, at full float32 precision, and lets autodiff transpose it; nearest
upsampling by a whole factor is a ``repeat``. Integer maps (labels) are
gathered in both forms.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from transkd_jax.models import kernels as kernels_lib


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


def nearest_matrix(in_size: int, out_size: int) -> np.ndarray:
  """PyTorch "nearest" as an (out_size, in_size) 0/1 matrix."""
  weights = np.zeros((out_size, in_size), np.float32)
  weights[np.arange(out_size), nearest_indices(in_size, out_size)] = 1.0
  return weights


@functools.lru_cache(maxsize=None)
def adjoint_taps(mode: str, in_size: int, out_size: int):
  """The transposed interpolation as gathers: (index, weight), each (in_size, taps).

  Source row k of the gradient is sum_t g[index[k, t]] * weight[k, t]; rows
  with fewer contributors are padded with weight 0. The weights are exactly
  the forward ones (bilinear: 1 - frac and frac), so the gradient equals
  the transpose of ``bilinear_matrix``.
  """
  if mode == "bilinear":
    lo, hi, frac = bilinear_taps(in_size, out_size)
    pairs = [(lo, 1.0 - frac), (hi, frac)]
  else:
    pairs = [(nearest_indices(in_size, out_size), np.ones(out_size, np.float32))]
  contrib = [[] for _ in range(in_size)]  # per source row: [(output row, weight)]
  for src, weight in pairs:
    for o in range(out_size):
      contrib[src[o]].append((o, weight[o]))
  taps = max(1, max(len(c) for c in contrib))
  index = np.zeros((in_size, taps), np.int32)
  weight = np.zeros((in_size, taps), np.float32)
  for k, c in enumerate(contrib):
    for t, (o, w) in enumerate(c):
      index[k, t], weight[k, t] = o, w
  return index, weight


def _bcast(v, x, axis):
  return jnp.asarray(v, x.dtype).reshape((-1,) + (1,) * (x.ndim - axis - 1))


def _interp_axis_fwd_impl(x, axis: int, out_size: int, mode: str):
  if mode == "nearest":
    return jnp.take(x, nearest_indices(x.shape[axis], out_size), axis=axis)
  lo, hi, frac = bilinear_taps(x.shape[axis], out_size)
  frac = _bcast(frac, x, axis)
  return jnp.take(x, lo, axis=axis) * (1 - frac) + jnp.take(x, hi, axis=axis) * frac


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _interp_axis(x, axis: int, in_size: int, out_size: int, mode: str):
  return _interp_axis_fwd_impl(x, axis, out_size, mode)


def _interp_axis_fwd(x, axis, in_size, out_size, mode):
  return _interp_axis_fwd_impl(x, axis, out_size, mode), None


def _interp_axis_bwd(axis, in_size, out_size, mode, _, g):
  index, weight = adjoint_taps(mode, in_size, out_size)
  out = None
  for t in range(index.shape[1]):
    term = jnp.take(g, index[:, t], axis=axis)
    if mode == "bilinear" or not np.all(weight[:, t] == 1.0):
      term = term * _bcast(weight[:, t], g, axis)
    out = term if out is None else out + term
  return (out,)


_interp_axis.defvjp(_interp_axis_fwd, _interp_axis_bwd)


def _native_axis(x, axis: int, out_size: int, mode: str):
  in_size = x.shape[axis]
  if mode == "nearest" and out_size % in_size == 0:
    return jnp.repeat(x, out_size // in_size, axis=axis)  # floor(i * in / out) = i // factor
  matrix = (bilinear_matrix if mode == "bilinear" else nearest_matrix)(in_size, out_size)
  y = jnp.tensordot(
    jnp.asarray(matrix, x.dtype), x, axes=(1, axis), precision=jax.lax.Precision.HIGHEST
  )
  return jnp.moveaxis(y, 0, axis)


def _resize(x, size, mode, kernels):
  kernels_lib.check_form(kernels)
  for axis, out_size in ((1, size[0]), (2, size[1])):
    if x.shape[axis] != out_size:
      if not jnp.issubdtype(x.dtype, jnp.inexact):  # integer maps (labels): a plain gather
        x = _interp_axis_fwd_impl(x, axis, int(out_size), mode)
      elif kernels == "cpu":
        x = _interp_axis(x, axis, x.shape[axis], int(out_size), mode)
      else:
        x = _native_axis(x, axis, int(out_size), mode)
  return x


def resize_bilinear(x: jnp.ndarray, size, kernels: str = "native") -> jnp.ndarray:
  """Resizes an NHWC map to ``size`` = (height, width) like PyTorch bilinear."""
  return _resize(x, size, "bilinear", kernels)


def resize_nearest(x: jnp.ndarray, size, kernels: str = "native") -> jnp.ndarray:
  """Resizes an NHWC (or NHW) array to ``size`` like PyTorch "nearest"."""
  return _resize(x, size, "nearest", kernels)
