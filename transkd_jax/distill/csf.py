"""Cross Selective Fusion (CSF): student stage maps -> teacher-width maps.

One unit per stage, run from the deepest stage to the shallowest; each unit
fuses its stage with the deeper unit's width-64 map through selective-kernel
channel attention (docs/transkd.md#cross-selective-fusion-csf-and-hcl). Its outputs are
compared with the teacher's stage maps by the hierarchical context loss.

Batch of one: the public code switches to a branch without BatchNorm (its
``fc1``) when a batch holds one image. We do the same computation for every
batch size: the attention's BatchNorm always runs (batch statistics in
training, running averages at evaluation), so a model's behaviour never depends
on how many images a device happens to see. The public branch's 1x1 weights
(``fc_single``, 64 x 32 per fused unit) are still declared, unused, so the
wrapper's parameter count and tree equal the public code's (TransKD-Base:
4,563,124 with a 20-way head); they receive zero gradient.
"""

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from transkd_jax.distill.layers import batch_norm, check_stage_count, conv
from transkd_jax.models import initializers as init
from transkd_jax.models.resize import resize_nearest

Dtype = Any


class CSFUnit(nn.Module):
  """One fusion unit. Returns (teacher-width output, width-``mid`` map passed on)."""

  mid: int
  out: int
  fuse: bool
  kernels: str = "native"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deeper=None, train: bool = False):
    dt, pdt = self.dtype, self.param_dtype
    x = conv(self.mid, 1, "conv1", dt, pdt)(x)
    x = batch_norm(train, "conv1_bn", dt, pdt)(x)
    if self.fuse:
      if deeper is None:
        raise ValueError("a fusing CSF unit needs the deeper unit's map")
      width = max(self.mid // 16, 32)
      y = resize_nearest(deeper, x.shape[1:3], self.kernels)
      s = jnp.mean(x + y, axis=(1, 2), keepdims=True)  # global average pool of U
      z = conv(width, 1, "fc", dt, pdt, kernel_init=init.torch_default_kernel)(s)
      z = nn.relu(batch_norm(train, "fc_bn", dt, pdt)(z))
      # The public code's batch-of-one branch: declared for parity, never used.
      self.param("fc_single", init.torch_default_kernel, (1, 1, self.mid, width), pdt)
      a = jnp.stack(
        [
          conv(
            self.mid,
            1,
            f"fcs_{i}",
            dt,
            pdt,
            use_bias=True,
            kernel_init=init.torch_default_kernel,
            fan_in=width,
          )(z)
          for i in range(2)
        ]
      )
      a = jax.nn.softmax(a.astype(jnp.float32), axis=0).astype(x.dtype)  # across branches
      self.sow("intermediates", "branch_weights", a)
      x = a[0] * x + a[1] * y
    out = conv(self.out, 3, "conv2", dt, pdt)(x)
    out = batch_norm(train, "conv2_bn", dt, pdt)(out)
    return out, x


class CrossSelectiveFusion(nn.Module):
  """Four CSF units; maps student stage maps (shallow -> deep) to teacher widths."""

  teacher_channels: Sequence[int]
  mid: int = 64
  kernels: str = "native"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, student_maps, train: bool = False):
    check_stage_count("CrossSelectiveFusion", student_maps)
    check_stage_count("CrossSelectiveFusion teacher_channels", self.teacher_channels)
    outputs = [None] * 4
    carried = None
    for stage in (3, 2, 1, 0):
      unit = CSFUnit(
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
