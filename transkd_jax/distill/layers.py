"""Small layers the distillation modules share, with the public code's initialisers."""

from typing import Any

from flax import linen as nn

from transkd_jax.models import initializers as init
from transkd_jax.models import kernels

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
