"""The baselines' adapters (modules only; their losses live in losses.py).

- ReviewKD: attention-based fusion (ABF) units, deepest stage first like CSF,
  whose outputs the hierarchical context loss compares with the teacher's.
- FitNet: a 1x1 convolution per stage from student to teacher channels (MSE).

CWD needs no adapter of its own: the public baseline compares the CSF outputs
(transkd_jax/distill/csf.py) with the teacher's stage maps.
"""

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from transkd_jax.distill.layers import batch_norm, check_stage_count, conv
from transkd_jax.models import initializers as init
from transkd_jax.models.resize import resize_nearest

Dtype = Any


class ABFUnit(nn.Module):
  """ReviewKD's attention-based fusion: a per-pixel, two-way sigmoid gate."""

  mid: int
  out: int
  fuse: bool
  kernels: str = "native"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deeper=None, train: bool = False):
    dt, pdt = self.dtype, self.param_dtype
    x = batch_norm(train, "conv1_bn", dt, pdt)(conv(self.mid, 1, "conv1", dt, pdt)(x))
    if self.fuse:
      if deeper is None:
        raise ValueError("a fusing ABF unit needs the deeper unit's map")
      y = resize_nearest(deeper, x.shape[1:3], self.kernels)
      z = conv(
        2,
        1,
        "att_conv",
        dt,
        pdt,
        use_bias=True,
        kernel_init=init.torch_default_kernel,
        fan_in=2 * self.mid,
      )(jnp.concatenate([x, y], axis=-1))
      z = jax.nn.sigmoid(z)
      x = x * z[..., 0:1] + y * z[..., 1:2]
    out = batch_norm(train, "conv2_bn", dt, pdt)(conv(self.out, 3, "conv2", dt, pdt)(x))
    return out, x


class ReviewFusion(nn.Module):
  """Four ABF units, deepest first; outputs in stage order (shallow -> deep)."""

  teacher_channels: Sequence[int]
  mid: int = 64
  kernels: str = "native"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, student_maps, train: bool = False):
    check_stage_count("ReviewFusion", student_maps)
    outputs = [None] * 4
    carried = None
    for stage in (3, 2, 1, 0):
      unit = ABFUnit(
        self.mid,
        self.teacher_channels[stage],
        fuse=stage < 3,
        kernels=self.kernels,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=f"stage{stage + 1}",
      )
      outputs[stage], carried = unit(student_maps[stage], carried, train)
    return tuple(outputs)


class FitNetAdapters(nn.Module):
  """A 1x1 convolution (with bias) per stage, student -> teacher channels."""

  teacher_channels: Sequence[int]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, student_maps, train: bool = False):
    check_stage_count("FitNetAdapters", student_maps)
    return tuple(
      conv(
        self.teacher_channels[i],
        1,
        f"stage{i + 1}",
        self.dtype,
        self.param_dtype,
        use_bias=True,
        kernel_init=init.torch_default_kernel,
        fan_in=m.shape[-1],
      )(m)
      for i, m in enumerate(student_maps)
    )
