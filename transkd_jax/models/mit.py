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
import numpy as np
from flax import linen as nn

from transkd_jax.models import initializers as init
from transkd_jax.models.variants import PATCH_GEOMETRY, get_variant

Dtype = Any

# LayerNorm epsilons differ by place in the public code; each is explicit.
EPS_PATCH = 1e-5  # patch embedding and spatial-reduction norms (PyTorch default)
EPS_BLOCK = 1e-6  # block norms and the norm closing each stage


def _dense(features, name, dtype, param_dtype):
  return nn.Dense(features, kernel_init=init.linear_kernel, bias_init=nn.initializers.zeros,
                  dtype=dtype, param_dtype=param_dtype, name=name)


def _layer_norm(eps, name, dtype, param_dtype):
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name)


def depthwise_impl(impl: str) -> str:
  """Resolves "auto" to the faster form of the 3x3 depthwise conv per backend.

  XLA:CPU runs grouped convolutions far slower than nine shifted
  multiply-adds (docs/performance.md); on GPU and TPU the native convolution is
  used. Both forms compute the same function.
  """
  if impl == "auto":
    return "shifted" if jax.default_backend() == "cpu" else "conv"
  if impl not in ("shifted", "conv"):
    raise ValueError(f"dwconv_impl must be 'auto', 'shifted' or 'conv', got {impl!r}")
  return impl


def _shifted_depthwise3x3(x, kernel):
  """sum_ij x_pad[h + i, w + j] * kernel[i, j]: 3x3 depthwise, padding 1, no bias."""
  height, width = x.shape[1:3]
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = None
  for i in range(3):
    for j in range(3):
      term = padded[:, i:i + height, j:j + width, :] * kernel[i, j]
      out = term if out is None else out + term
  return out


@jax.custom_vjp
def shifted_depthwise3x3(x, kernel):
  """3x3 depthwise conv (NHWC, kernel 3 x 3 x C) as nine shifted multiply-adds.

  The gradient is written out (custom VJP) rather than left to autodiff,
  which on XLA:CPU saves the nine shifted copies of ``x`` as residuals
  (9x the activation memory) and transposes them back through nine padded adds:

  * d x = the same shifted sum over the output gradient with the kernel
    flipped (a correlation's adjoint is the convolution);
  * d kernel[i, j] = sum over pixels of x_pad[h + i, w + j] * g[h, w],
    all nine taps in one variadic reduction, i.e. one pass over ``x`` and
    ``g`` (nine separate sums would each materialise a shifted copy on XLA:CPU).
  """
  return _shifted_depthwise3x3(x, kernel)


def _shifted_depthwise3x3_fwd(x, kernel):
  return _shifted_depthwise3x3(x, kernel), (x, kernel)


def _shifted_depthwise3x3_bwd(residuals, g):
  x, kernel = residuals
  height, width = x.shape[1:3]
  dx = _shifted_depthwise3x3(g, kernel[::-1, ::-1])
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  # Rows are summed in up to 8 chunks per image first: the outer (batch,
  # chunk) dimensions let XLA:CPU split the reduction across threads.
  chunks = max(d for d in range(1, 9) if height % d == 0)
  shape = (x.shape[0], chunks, height // chunks, width, x.shape[3])
  products = tuple((padded[:, i:i + height, j:j + width, :] * g).reshape(shape)
                   for i in range(3) for j in range(3))
  zero = jnp.zeros((), g.dtype)
  sums = jax.lax.reduce(products, (zero,) * 9,
                        lambda a, b: tuple(u + v for u, v in zip(a, b)), (2, 3))
  dkernel = jnp.stack(sums).sum((1, 2)).reshape(kernel.shape).astype(kernel.dtype)
  return dx, dkernel


shifted_depthwise3x3.defvjp(_shifted_depthwise3x3_fwd, _shifted_depthwise3x3_bwd)


class DepthwiseConv3x3(nn.Module):
  """3x3 depthwise convolution with bias, stride 1, padding 1 (Mix-FFN)."""
  impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    kernel = self.param("kernel", init.conv_kernel(9), (3, 3, 1, channels), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if depthwise_impl(self.impl) == "shifted":
      out = shifted_depthwise3x3(x, kernel[:, :, 0, :])
    else:
      out = jax.lax.conv_general_dilated(
          x, kernel, (1, 1), ((1, 1), (1, 1)),
          dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels)
    return out + bias


class PatchConv(nn.Module):
  """Convolution with kernel = stride = ``ratio`` and bias, no padding.

  This is the spatial reduction of efficient self-attention. It is exactly a
  reshape into non-overlapping patches and one matmul, which is fast forwards
  and backwards everywhere. Like PyTorch, trailing rows/columns that do not
  fill a patch are dropped. The kernel is stored HWIO like ``nn.Conv``.
  """
  features: int
  ratio: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    r, c = self.ratio, x.shape[-1]
    kernel = self.param("kernel", init.conv_kernel(r * r * self.features),
                        (r, r, c, self.features), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    batch, height, width = x.shape[:3]
    h, w = height // r, width // r
    x = x[:, :h * r, :w * r].reshape(batch, h, r, w, r, c)
    return jnp.einsum("bhiwjc,ijcd->bhwd", x, kernel) + bias


def _softmax_attention_fwd(q, k, v):
  scale = np.asarray(q.shape[-1] ** -0.5, q.dtype)
  logits = jnp.einsum("btnh,bsnh->bnts", q * scale, k)
  e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  probs = e * (1 / jnp.sum(e, axis=-1, keepdims=True))
  out = jnp.einsum("bnts,bsnh->btnh", probs, v)
  return out, (q, k, v, probs, out)


@jax.custom_vjp
def softmax_attention(q, k, v):
  """softmax(q k^T / sqrt(head_dim)) v for (batch, tokens, heads, head_dim) inputs.

  The same function as ``jax.nn.dot_product_attention(q, k, v)``, with the
  textbook backward pass written out: with P the probabilities and O the
  output, dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = dS K / sqrt(d),
  dK = dS^T Q / sqrt(d). On XLA:CPU this is faster than autodiff through
  ``jax.nn.dot_product_attention``, which fuses the softmax backward into one
  slow fusion (docs/performance.md).
  """
  return _softmax_attention_fwd(q, k, v)[0]


def _softmax_attention_bwd(residuals, g):
  q, k, v, probs, out = residuals
  scale = np.asarray(q.shape[-1] ** -0.5, q.dtype)
  dv = jnp.einsum("bnts,btnh->bsnh", probs, g)
  dprobs = jnp.einsum("btnh,bsnh->bnts", g, v)
  rowdot = jnp.einsum("btnh,btnh->bnt", g, out)[..., None]
  dlogits = probs * (dprobs - rowdot)
  dq = jnp.einsum("bnts,bsnh->btnh", dlogits, k) * scale
  dk = jnp.einsum("bnts,btnh->bsnh", dlogits, q) * scale
  return dq, dk, dv


softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def attention(q, k, v):
  """Scaled dot-product attention; per backend, the faster of two equal forms.

  XLA:CPU: ``softmax_attention`` (hand-written VJP). Elsewhere:
  ``jax.nn.dot_product_attention``, which GPU backends may lower to fused
  kernels.
  """
  if jax.default_backend() == "cpu":
    return softmax_attention(q, k, v)
  return jax.nn.dot_product_attention(q, k, v)


class EfficientSelfAttention(nn.Module):
  """Multi-head attention with keys/values from a spatially reduced copy."""
  num_heads: int
  sr_ratio: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, hw):
    batch, tokens, channels = x.shape
    head_dim = channels // self.num_heads
    q = _dense(channels, "q", self.dtype, self.param_dtype)(x)
    context = x
    if self.sr_ratio > 1:
      grid = x.reshape(batch, hw[0], hw[1], channels)
      grid = PatchConv(channels, self.sr_ratio, self.dtype, self.param_dtype, name="sr")(grid)
      context = grid.reshape(batch, -1, channels)
      context = _layer_norm(EPS_PATCH, "norm", self.dtype, self.param_dtype)(context)
    kv = _dense(2 * channels, "kv", self.dtype, self.param_dtype)(context)
    # As in the public code: the first half of kv's outputs is k, the second v.
    k, v = jnp.split(kv, 2, axis=-1)
    split = lambda t: t.reshape(batch, t.shape[1], self.num_heads, head_dim)
    out = attention(split(q), split(k), split(v))  # scale head_dim**-0.5
    out = out.reshape(batch, tokens, channels)
    return _dense(channels, "proj", self.dtype, self.param_dtype)(out)


class MixFFN(nn.Module):
  """Linear (C->4C), 3x3 depthwise conv over the token grid, exact GELU, linear."""
  hidden: int
  dwconv_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, hw):
    batch, tokens, channels = x.shape
    x = _dense(self.hidden, "fc1", self.dtype, self.param_dtype)(x)
    x = x.reshape(batch, hw[0], hw[1], self.hidden)
    x = DepthwiseConv3x3(self.dwconv_impl, self.dtype, self.param_dtype, name="dwconv")(x)
    x = x.reshape(batch, tokens, self.hidden)
    # Exact (erf) GELU. Written with erf instead of flax's erfc it is faster
    # alone on XLA:CPU but slower in the model (XLA then fuses the depthwise
    # conv into the fc2 matmul's YNNPACK fusion with materialised shifted
    # copies), so flax's form stays.
    x = nn.gelu(x, approximate=False)
    return _dense(channels, "fc2", self.dtype, self.param_dtype)(x)


class Block(nn.Module):
  """x + DropPath(Attn(LN(x))), then x + DropPath(MixFFN(LN(x)))."""
  num_heads: int
  sr_ratio: int
  mlp_ratio: int
  drop_path: float
  dwconv_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, hw, train: bool):
    channels = x.shape[-1]
    # Stochastic depth: drop the whole residual branch per sample.
    drop = nn.Dropout(self.drop_path, broadcast_dims=(1, 2), rng_collection="dropout")
    y = _layer_norm(EPS_BLOCK, "norm1", self.dtype, self.param_dtype)(x)
    y = EfficientSelfAttention(self.num_heads, self.sr_ratio, self.dtype, self.param_dtype,
                               name="attn")(y, hw)
    x = x + drop(y, deterministic=not train)
    y = _layer_norm(EPS_BLOCK, "norm2", self.dtype, self.param_dtype)(x)
    y = MixFFN(channels * self.mlp_ratio, self.dwconv_impl, self.dtype, self.param_dtype,
               name="mlp")(y, hw)
    return x + drop(y, deterministic=not train)


class OverlapPatchEmbed(nn.Module):
  """Strided conv with bias, flattened to tokens, LayerNorm (eps 1e-5)."""
  features: int
  kernel: int
  stride: int
  padding: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x) -> Tuple[jnp.ndarray, Tuple[int, int]]:
    k, p = self.kernel, self.padding
    x = nn.Conv(self.features, (k, k), strides=self.stride, padding=((p, p), (p, p)),
                kernel_init=init.conv_kernel(k * k * self.features),
                bias_init=nn.initializers.zeros, dtype=self.dtype,
                param_dtype=self.param_dtype, name="proj")(x)
    batch, height, width, channels = x.shape
    x = x.reshape(batch, height * width, channels)
    x = _layer_norm(EPS_PATCH, "norm", self.dtype, self.param_dtype)(x)
    return x, (height, width)


class MixTransformer(nn.Module):
  """The MiT encoder. Returns (stage maps NHWC, patch embeddings N x T x C)."""
  variant: str = "b0"
  dwconv_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    spec = get_variant(self.variant)
    rates = np.linspace(0.0, spec.drop_path_rate, sum(spec.depths))
    features, embeddings = [], []
    x = images
    block_index = 0
    for stage in range(4):
      kernel, stride, padding = PATCH_GEOMETRY[stage]
      tokens, hw = OverlapPatchEmbed(spec.channels[stage], kernel, stride, padding,
                                     self.dtype, self.param_dtype,
                                     name=f"patch_embed{stage + 1}")(x)
      embeddings.append(tokens)
      for j in range(spec.depths[stage]):
        tokens = Block(spec.heads[stage], spec.sr_ratios[stage], spec.mlp_ratio,
                       float(rates[block_index]), self.dwconv_impl, self.dtype,
                       self.param_dtype, name=f"block{stage + 1}_{j}")(tokens, hw, train)
        block_index += 1
      tokens = _layer_norm(EPS_BLOCK, f"norm{stage + 1}", self.dtype, self.param_dtype)(tokens)
      x = tokens.reshape(tokens.shape[0], hw[0], hw[1], tokens.shape[-1])
      features.append(x)
    return tuple(features), tuple(embeddings)
