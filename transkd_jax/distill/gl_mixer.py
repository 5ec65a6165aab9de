"""Global-Local Context Mixer (TransKD-GL), applied to the student's stage-4 embedding.

global = multi-head self-attention over all tokens (no qkv bias, no spatial
reduction, output projection); local = a gated convolution along the token
sequence, conv1d(E) * sigmoid(conv1d'(E)) (kernel 3, padding 1); the output is
a * global + b * local (+ E when ``residual``). The public code leaves a and b
as uninitialised memory; we initialise both deliberately (default 1.0, config
``distill.gl_mix_init``). The residual is off in the published evaluation.
"""

from typing import Any, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from transkd_jax.distill.layers import dense
from transkd_jax.models import initializers as init
from transkd_jax.models import kernels

Dtype = Any


class GLMixer(nn.Module):
  num_heads: int = 8
  residual: bool = False
  mix_init: Tuple[float, float] = (1.0, 1.0)
  kernels: str = "native"  # transkd_jax/models/kernels.py
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, e):
    batch, tokens, dim = e.shape
    if dim % self.num_heads:
      raise ValueError(f"GL-Mixer: {dim} channels do not split into {self.num_heads} heads")
    dt, pdt = self.dtype, self.param_dtype
    head_dim = dim // self.num_heads
    # qkv laid out as the public code's (3, heads, head_dim) for checkpoint parity.
    qkv = dense(3 * dim, dim, "qkv", dt, pdt, use_bias=False)(e)
    qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim)
    attended = kernels.attention(
      qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], self.kernels
    )  # scale head_dim ** -0.5
    glob = dense(dim, dim, "proj", dt, pdt)(attended.reshape(batch, tokens, dim))

    def conv1d(name):
      return nn.Conv(
        dim,
        (3,),
        padding=((1, 1),),
        kernel_init=init.torch_default_kernel,
        bias_init=init.torch_default_bias(3 * dim),
        dtype=dt,
        param_dtype=pdt,
        name=name,
      )

    local = conv1d("conv1")(e) * jax.nn.sigmoid(conv1d("conv2")(e))
    a = self.param("atten_weight", nn.initializers.constant(self.mix_init[0]), (1,), pdt)
    b = self.param("conv_weight", nn.initializers.constant(self.mix_init[1]), (1,), pdt)
    out = a.astype(dt) * glob + b.astype(dt) * local
    return out + e if self.residual else out
