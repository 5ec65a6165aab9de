"""Initialisers of the public PyTorch code, in Flax terms.

They matter only for training from scratch (TransKD's student starts from
random weights), but then they matter: see
docs/transkd.md#blocks-layernorm-epsilons-and-initialisation.
"""

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

# MiT linear layers: timm's trunc_normal_(std=.02), biases zero. timm's bounds a=-2, b=2
# are absolute values, 100 standard deviations out, so the std stays 0.02. (flax's
# default bounds are +-2 standard deviations, which lower the std to 0.0176.)
linear_kernel = nn.initializers.truncated_normal(stddev=0.02, lower=-2.0 / 0.02, upper=2.0 / 0.02)


def conv_kernel(fan_out: int):
  """MiT convolutions: normal with std sqrt(2 / fan_out), fan_out = k*k*out/groups."""
  return nn.initializers.normal(stddev=math.sqrt(2.0 / fan_out))


# PyTorch's default for nn.Linear / nn.Conv2d weights (kaiming_uniform, a=sqrt(5)):
# uniform in +-1/sqrt(fan_in). The SegFormer head's layers are made after the
# encoder's init pass, so they keep this default.
torch_default_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias(fan_in: int):
  """PyTorch's default bias: uniform in +-1/sqrt(fan_in)."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init
