"""Mix Transformer (MiT) encoder of SegFormer, NHWC, as flax.linen modules.

Stage i: overlapping patch embedding -> depth[i] blocks -> LayerNorm, reshaped
to a feature map that feeds the next stage. The encoder returns the four stage
maps (NHWC) and the four patch-embedding outputs (N x tokens x C): TransKD
distils both. Parameter names follow the public PyTorch code (patch_embed1,
block1_0, attn.q / attn.kv / attn.sr, mlp.fc1 / dwconv / fc2, norm1 ...) so
that ``transkd_jax.convert`` is a plain rename.
"""

from typing import Any, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from transkd_jax.models import initializers as init
from transkd_jax.models import kernels
from transkd_jax.models.base import StageEncoder, patch_embed
from transkd_jax.models.variants import get_variant

Dtype = Any

# LayerNorm epsilons differ by place in the public code; each is explicit.
EPS_PATCH = 1e-5  # patch embedding and spatial-reduction norms (PyTorch default)
EPS_BLOCK = 1e-6  # block norms and the norm closing each stage


def dense(features, name, dtype, param_dtype, use_bias=True):
  """A Linear layer (timm's trunc-normal init, zero bias) over ``kernels.linear``."""
  return nn.Dense(
    features,
    use_bias=use_bias,
    kernel_init=init.linear_kernel,
    bias_init=nn.initializers.zeros,
    dtype=dtype,
    param_dtype=param_dtype,
    dot_general=kernels.dense_dot_general,
    name=name,
  )


def layer_norm(eps, name, dtype, param_dtype):
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name)


def gelu(x):
  """Exact GELU, x * Phi(x), through erf as PyTorch's ``nn.GELU()`` computes it.

  ``flax.linen.gelu(x, approximate=False)`` goes through erfc, which XLA:CPU
  evaluates with an exp and more selects: the whole train step is 3-6 %
  slower with it (docs/performance.md). The two differ by float rounding.
  """
  return x * (0.5 + 0.5 * jax.lax.erf(x * 2**-0.5))


class DepthwiseConv3x3(nn.Module):
  """3x3 depthwise convolution with bias, stride 1, padding 1 (Mix-FFN)."""

  kernels: str = "native"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    kernel = self.param("kernel", init.conv_kernel(9), (3, 3, 1, channels), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return kernels.depthwise3x3(x, kernel, self.kernels) + bias


class PatchConv(nn.Module):
  """Convolution with kernel = stride = ``ratio`` and bias, no padding.

  This is the spatial reduction of efficient self-attention. Like PyTorch, trailing
  rows/columns that do not fill a patch are dropped. The kernel is stored HWIO like
  ``nn.Conv``; ``kernels.patch_matmul`` computes it in the form's way.
  """

  features: int
  ratio: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernels: str = "native"

  @nn.compact
  def __call__(self, x):
    r, c = self.ratio, x.shape[-1]
    kernel = self.param(
      "kernel", init.conv_kernel(r * r * self.features), (r, r, c, self.features), self.param_dtype
    )
    bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return kernels.patch_matmul(x, kernel, self.kernels) + bias


class EfficientSelfAttention(nn.Module):
  """Multi-head attention with keys/values from a spatially reduced copy."""

  num_heads: int
  sr_ratio: int
  kernels: str = "native"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, hw):
    batch, tokens, channels = x.shape
    head_dim = channels // self.num_heads
    q = dense(channels, "q", self.dtype, self.param_dtype)(x)
    context = x
    if self.sr_ratio > 1:
      grid = x.reshape(batch, hw[0], hw[1], channels)
      sr = PatchConv(channels, self.sr_ratio, self.dtype, self.param_dtype, self.kernels, name="sr")
      grid = sr(grid)
      context = grid.reshape(batch, -1, channels)
      context = layer_norm(EPS_PATCH, "norm", self.dtype, self.param_dtype)(context)
    kv = dense(2 * channels, "kv", self.dtype, self.param_dtype)(context)
    # As in the public code: the first half of kv's outputs is k, the second v.
    k, v = jnp.split(kv, 2, axis=-1)

    def split(t):
      return t.reshape(batch, t.shape[1], self.num_heads, head_dim)

    out = kernels.attention(split(q), split(k), split(v), self.kernels)  # scale head_dim**-0.5
    out = out.reshape(batch, tokens, channels)
    return dense(channels, "proj", self.dtype, self.param_dtype)(out)


class MixFFN(nn.Module):
  """Linear (C -> hidden = mlp ratio x C), 3x3 depthwise conv over the token grid, exact GELU,
  linear."""

  hidden: int
  kernels: str = "native"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, hw):
    batch, tokens, channels = x.shape
    x = dense(self.hidden, "fc1", self.dtype, self.param_dtype)(x)
    x = x.reshape(batch, hw[0], hw[1], self.hidden)
    x = DepthwiseConv3x3(self.kernels, self.dtype, self.param_dtype, name="dwconv")(x)
    x = x.reshape(batch, tokens, self.hidden)
    x = gelu(x)
    return dense(channels, "fc2", self.dtype, self.param_dtype)(x)


class Block(nn.Module):
  """x + DropPath(Attn(LN(x))), then x + DropPath(MixFFN(LN(x)))."""

  num_heads: int
  sr_ratio: int
  mlp_ratio: int
  drop_path: float
  kernels: str = "native"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, hw, train: bool):
    channels = x.shape[-1]
    # Stochastic depth: drop the whole residual branch per sample.
    drop = nn.Dropout(self.drop_path, broadcast_dims=(1, 2), rng_collection="dropout")
    y = layer_norm(EPS_BLOCK, "norm1", self.dtype, self.param_dtype)(x)
    y = EfficientSelfAttention(
      self.num_heads, self.sr_ratio, self.kernels, self.dtype, self.param_dtype, name="attn"
    )(y, hw)
    x = x + drop(y, deterministic=not train)
    y = layer_norm(EPS_BLOCK, "norm2", self.dtype, self.param_dtype)(x)
    y = MixFFN(channels * self.mlp_ratio, self.kernels, self.dtype, self.param_dtype, name="mlp")(
      y, hw
    )
    return x + drop(y, deterministic=not train)


def patch_conv(embed, form: str = "native"):
  """The strided conv with bias of a patch embedding (``features``, ``kernel``, ``stride``,
  ``padding``, dtypes: its attributes), named ``proj``; call it inside the embedding.
  ``form``: the kernel form (``kernels.patch_conv``: on TPUs an image's conv runs over
  blocks of pixels)."""
  k, p = embed.kernel, embed.padding
  return nn.Conv(
    embed.features,
    (k, k),
    strides=embed.stride,
    padding=((p, p), (p, p)),
    kernel_init=init.conv_kernel(k * k * embed.features),
    bias_init=nn.initializers.zeros,
    dtype=embed.dtype,
    param_dtype=embed.param_dtype,
    conv_general_dilated=kernels.patch_conv(form),
    name="proj",
  )


class OverlapPatchEmbed(nn.Module):
  """Strided conv with bias, flattened to tokens, LayerNorm (eps 1e-5)."""

  features: int
  kernel: int
  stride: int
  padding: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernels: str = "native"

  @nn.compact
  def __call__(self, x) -> Tuple[jnp.ndarray, Tuple[int, int]]:
    x = patch_conv(self, self.kernels)(x)
    batch, height, width, channels = x.shape
    x = x.reshape(batch, height * width, channels)
    x = layer_norm(EPS_PATCH, "norm", self.dtype, self.param_dtype)(x)
    return x, (height, width)


class MixTransformer(StageEncoder):
  """The MiT encoder. Returns (stage maps NHWC, patch embeddings N x T x C).

  Stage s: ``patch_embed{s}`` (tokens after its LayerNorm are the stage's embedding),
  blocks ``block{s}_{j}`` on the tokens, LayerNorm ``norm{s}``, reshaped to the map.
  """

  variant: Any = "b0"

  def row(self):
    return get_variant(self.variant)

  def embed(self, stage, spec, x):
    tokens, hw = patch_embed(
      OverlapPatchEmbed, stage, spec.channels[stage], self.dtype, self.param_dtype, self.kernels
    )(x)
    return (tokens, hw), tokens

  def block(self, stage, index, spec, drop_path, state, train):
    tokens, hw = state
    tokens = self.block_class(Block, static_argnums=(2, 3))(
      spec.heads[stage],
      spec.sr_ratios[stage],
      spec.mlp_ratios[stage],
      drop_path,
      self.kernels,
      self.dtype,
      self.param_dtype,
      name=f"block{stage + 1}_{index}",
    )(tokens, hw, train)
    return tokens, hw

  def close(self, stage, state):
    tokens, hw = state
    tokens = layer_norm(EPS_BLOCK, f"norm{stage + 1}", self.dtype, self.param_dtype)(tokens)
    return tokens.reshape(tokens.shape[0], hw[0], hw[1], tokens.shape[-1])
