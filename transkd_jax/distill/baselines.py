"""The baselines' adapters (modules only; their losses live in losses.py).

- ReviewKD: attention-based fusion (ABF) units, deepest stage first like CSF,
  whose outputs the hierarchical context loss compares with the teacher's.
- FitNet: a 1x1 convolution per stage from student to teacher channels (MSE).

CWD needs no adapter of its own: the public baseline compares the CSF outputs
(transkd_jax/distill/csf.py) with the teacher's stage maps.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

from transkd_jax.distill.layers import (
  FusionChain,
  FusionUnit,
  StageAdapter,
  check_stage_count,
  conv,
)
from transkd_jax.models import initializers as init


class ABFUnit(FusionUnit):
  """ReviewKD's attention-based fusion: a per-pixel, two-way sigmoid gate."""

  kind = "ABF"

  def mix(self, x, y, train: bool):
    z = conv(
      2,
      1,
      "att_conv",
      self.dtype,
      self.param_dtype,
      use_bias=True,
      kernel_init=init.torch_default_kernel,
      fan_in=2 * self.mid,
    )(jnp.concatenate([x, y], axis=-1))
    z = jax.nn.sigmoid(z)
    return x * z[..., 0:1] + y * z[..., 1:2]


class ReviewFusion(FusionChain):
  """Four ABF units, deepest first; outputs in stage order (shallow -> deep)."""

  unit = ABFUnit


class FitNetAdapters(StageAdapter):
  """A 1x1 convolution (with bias) per stage, student -> teacher channels."""

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
