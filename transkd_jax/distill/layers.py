"""Small layers the distillation modules share, with the public code's initialisers."""

from typing import Any, Sequence

import jax.numpy as jnp
from flax import linen as nn

from transkd_jax.models import initializers as init
from transkd_jax.models import kernels
from transkd_jax.models.resize import resize_nearest

Dtype = Any

# nn.init.kaiming_uniform_(w, a=1): uniform in +-sqrt(3 / fan_in). CSF's and
# ReviewKD's conv1 / conv2 are initialised this way in the public code.
kaiming_uniform_a1 = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


def conv(
  features: int,
  kernel: int,
  name: str,
  dtype: Dtype,
  param_dtype: Dtype,
  use_bias: bool = False,
  kernel_init=kaiming_uniform_a1,
  fan_in: int = 0,
):
  """A stride-1 'same' convolution (PyTorch padding kernel // 2).

  With a bias, the bias gets PyTorch's default init for ``fan_in`` inputs.
  """
  pad = kernel // 2
  bias_init = init.torch_default_bias(fan_in) if use_bias else nn.initializers.zeros
  return nn.Conv(
    features,
    (kernel, kernel),
    padding=((pad, pad), (pad, pad)),
    use_bias=use_bias,
    kernel_init=kernel_init,
    bias_init=bias_init,
    dtype=dtype,
    param_dtype=param_dtype,
    name=name,
  )


def batch_norm(train: bool, name: str, dtype: Dtype, param_dtype: Dtype):
  """PyTorch BatchNorm2d defaults: momentum 0.1 (flax 0.9), eps 1e-5.

  In training the statistics are the global batch's (under jit over a mesh
  the batch axis is the whole sharded batch); at evaluation, running averages.
  """
  return nn.BatchNorm(
    use_running_average=not train,
    momentum=0.9,
    epsilon=1e-5,
    dtype=dtype,
    param_dtype=param_dtype,
    name=name,
  )


def dense(
  features: int, fan_in: int, name: str, dtype: Dtype, param_dtype: Dtype, use_bias: bool = True
):
  """nn.Linear with PyTorch's default initialisation (the public modules keep it)."""
  return nn.Dense(
    features,
    use_bias=use_bias,
    kernel_init=init.torch_default_kernel,
    bias_init=init.torch_default_bias(fan_in),
    dtype=dtype,
    param_dtype=param_dtype,
    dot_general=kernels.dense_dot_general,
    name=name,
  )


def check_stage_count(name: str, values, expected: int = 4):
  if len(values) != expected:
    raise ValueError(f"{name} needs {expected} stages, got {len(values)}")


class StageAdapter(nn.Module):
  """A per-stage adapter to the teacher's stage widths (FitNet's, PEA's, EA's)."""

  teacher_channels: Sequence[int]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32


class FusionUnit(nn.Module):
  """One unit of a fusion chain (CSF's, ReviewKD's ABF): returns (teacher-width output,
  the width-``mid`` map passed on to the next, shallower unit).

  1x1 conv + BatchNorm to ``mid`` channels; a fusing unit then mixes that map with
  the deeper unit's (nearest-resized to its size) by ``mix``, which each kind of
  unit defines; 3x3 conv + BatchNorm to the teacher's ``out`` channels.
  """

  mid: int
  out: int
  fuse: bool
  kernels: str = "native"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  kind = "fusion"  # names the unit in errors

  def mix(self, x, deeper, train: bool):
    """x and the deeper map, both N x H x W x mid -> their mixture (called inside __call__)."""
    raise NotImplementedError

  @nn.compact
  def __call__(self, x, deeper=None, train: bool = False):
    dt, pdt = self.dtype, self.param_dtype
    x = batch_norm(train, "conv1_bn", dt, pdt)(conv(self.mid, 1, "conv1", dt, pdt)(x))
    if self.fuse:
      if deeper is None:
        raise ValueError(f"a fusing {self.kind} unit needs the deeper unit's map")
      x = self.mix(x, resize_nearest(deeper, x.shape[1:3], self.kernels), train)
    out = batch_norm(train, "conv2_bn", dt, pdt)(conv(self.out, 3, "conv2", dt, pdt)(x))
    return out, x


class FusionChain(nn.Module):
  """Four ``unit``s, run from the deepest stage to the shallowest, each fusing its stage
  with the deeper unit's map; maps student stage maps (shallow -> deep) to teacher widths.

  Subclasses name their unit class: ``unit = CSFUnit``. Unit i is named ``stage{i}``.
  """

  teacher_channels: Sequence[int]
  mid: int = 64
  kernels: str = "native"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  unit = FusionUnit  # a subclass of FusionUnit

  @nn.compact
  def __call__(self, student_maps, train: bool = False):
    name = type(self).__name__
    check_stage_count(name, student_maps)
    check_stage_count(f"{name} teacher_channels", self.teacher_channels)
    outputs = [None] * 4
    carried = None
    for stage in (3, 2, 1, 0):
      unit = self.unit(
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
