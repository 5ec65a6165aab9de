"""LVT (Lite Vision Transformer) with the SegFormer all-MLP head, NHWC, as in TransKD.

    model = LVT(variant="lvt", num_classes=19)
    variables = model.init(jax.random.key(0), images)           # params, batch_stats
    out = model.apply(variables, images)
    out["logits"]      # N x H/4 x W/4 x classes (float32)
    out["features"]    # four stage maps: the raw outputs of each stage's last block, NHWC
    out["embeddings"]  # four patch-embedding conv outputs BEFORE their LayerNorm, N x tokens x C

The public ``lvt(rasa_cfg=dict(atrous_rates=[1, 3, 5], act_layer='nn.SiLU(True)',
init='kaiming', r_num=2))`` (train/models/lvt/backbone.py, ``with_cls_head=False``):

* stage s: overlapping patch embedding (conv 7/4/3, then 3/2/1, with bias;
  LayerNorm) -> blocks ``x + attn(norm1(x)); x + mlp(norm2(x))`` on the NHWC
  grid. No norm closes a stage (``downstream_norms`` are Identity). Every
  LayerNorm has PyTorch's default eps 1e-5.
* stage 1 attention is CSA (convolutional self-attention, ``CSA``), stages
  2-4 RASA (recursive atrous self-attention, ``RecursiveAtrousAttention``).
* stage 1 MLP: Linear -> exact GELU -> Linear; stages 2-4: MiT's Mix-FFN
  (1x1 conv, 3x3 depthwise conv with bias, GELU, 1x1 conv).
* head: SegFormer's all-MLP head, width 256, no dropout (the public code's
  Dropout2d rate is its drop_path_rate, 0).

Public names -> ours (torch OIHW conv weights -> flax HWIO kernels; 1x1 conv
weights (out, in, 1, 1) of the Mix-FFN -> Dense kernels (in, out); torch Linear
(out, in) -> Dense (in, out)); s = stage 1..4, b = block:

    backbone.{s-1}.0.proj.{weight,bias}            encoder/patch_embed{s}/proj/{kernel,bias}
    backbone.{s-1}.0.norm.{weight,bias}            encoder/patch_embed{s}/norm/{scale,bias}
    backbone.{s-1}.1.{b}.norm1.{weight,bias}       encoder/block{s}_{b}/norm1/{scale,bias}
    backbone.{s-1}.1.{b}.norm2.{weight,bias}       encoder/block{s}_{b}/norm2/{scale,bias}
  CSA (stage 1):
    backbone.0.1.{b}.attn.attn.{weight,bias}       encoder/block1_{b}/attn/attn/{kernel,bias}
    backbone.0.1.{b}.attn.weight.weight (9C, C, 1, 1), a 1x1 conv in 9 groups
                                                   encoder/block1_{b}/attn/weight/kernel
                                                   (1, 1, C, 9C): OIHW -> HWIO, as nn.Conv
                                                   with feature_group_count=9 stores it
    backbone.0.1.{b}.attn.proj.{weight,bias}       encoder/block1_{b}/attn/proj/{kernel,bias}
    backbone.0.1.{b}.mlp.fc1/fc2.{weight,bias}     encoder/block1_{b}/mlp/fc1|fc2/{kernel,bias}
  RASA (stages 2-4), prefix P = backbone.{s-1}.1.{b}.attn, ours Q = encoder/block{s}_{b}/attn:
    P.q.weight                          Q/q/kernel
    P.ds.weight (C, 1, 3, 3)            Q/ds/kernel (3, 3, 1, C)
    P.sr.{weight,bias}                  Q/sr/{kernel,bias}       (sr > 1)
    P.norm.{weight,bias}                Q/norm/{scale,bias}      (sr > 1)
    P.kv.weight                         Q/kv/kernel
    P.proj.{weight,bias}                Q/proj/{kernel,bias}
  Mix-FFN (stages 2-4), backbone.{s-1}.1.{b}.mlp -> encoder/block{s}_{b}/mlp:
    fc1.{weight,bias}                   fc1/{kernel,bias}        (1x1 conv -> Dense)
    depconv.{weight,bias}               dwconv/{kernel,bias}
    fc2.{weight,bias}                   fc2/{kernel,bias}        (1x1 conv -> Dense)
  head (as SegFormer's):
    linear_c{i}.proj.{weight,bias}                 head/linear_c{i}/{kernel,bias}
    linear_fuse.conv.weight                        head/linear_fuse/kernel (1, 1, 4 x 256, 256)
    linear_fuse.bn.{weight,bias}                   head/bn/{scale,bias}
    linear_fuse.bn.running_{mean,var}              batch_stats head/bn/{mean,var}
    linear_pred.{weight,bias}                      head/linear_pred/{kernel,bias}

Initialisation follows the public code where it is cheap to (trunc-normal Linears,
fan-out normal patch-embedding / sr convs and CSA's grouped weight, kaiming-uniform
``ds``); where modules are shared with MiT / SegFormer they keep MiT's / SegFormer's
initialisers, which differ from the public LVT's in two places: the Mix-FFN 1x1 /
depthwise convs (public: PyTorch's default Conv2d init; here MiT's) and the head's
linear_c* (public: trunc normal std 0.02, the backbone's init pass reaches them;
here PyTorch's default Linear init as in SegFormer's head).
"""

from typing import Any, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from transkd_jax.models import initializers as init
from transkd_jax.models import kernels as kernels_lib
from transkd_jax.models.base import SegmentationModel, StageEncoder, patch_embed
from transkd_jax.models.mit import MixFFN, PatchConv, dense, gelu, layer_norm, patch_conv
from transkd_jax.models.variants import lookup_row

Dtype = Any

EPS = 1e-5  # nn.LayerNorm's default, used by every LayerNorm of LVT


class LVTVariant(NamedTuple):
  channels: Tuple[int, int, int, int]
  depths: Tuple[int, int, int, int]
  heads: Tuple[int, int, int, int]
  mlp_ratios: Tuple[int, int, int, int]
  # Stage s's MLP: Mix-FFN (True) or Linear-GELU-Linear (False).
  mlp_depconv: Tuple[bool, bool, bool, bool] = (False, True, True, True)
  sr_ratios: Tuple[int, int, int, int] = (8, 4, 2, 1)  # CSA stages ignore theirs
  attention: Tuple[str, str, str, str] = ("csa", "rasa", "rasa", "rasa")
  atrous_rates: Tuple[int, ...] = (1, 3, 5)  # rasa_cfg.atrous_rates
  recursions: int = 2  # rasa_cfg.r_num
  decoder_width: int = 256
  drop_path_rate: float = 0.0
  head_dropout: float = 0.0  # the public head's Dropout2d rate is drop_path_rate


LVT_VARIANTS = {
  "lvt": LVTVariant(
    channels=(64, 64, 160, 256), depths=(2, 2, 2, 2), heads=(2, 2, 5, 8), mlp_ratios=(4, 8, 4, 4)
  ),
}


def get_lvt_variant(name) -> LVTVariant:
  """The row for ``name`` ('lvt'); an LVTVariant passes through (tests build tiny ones)."""
  return lookup_row(name, LVT_VARIANTS, LVTVariant, "LVT")


# --------------------------------------------------------------------------
# CSA's building blocks: a 2x2 ceil-mode average pool, unfold and fold (3x3, pad 1, stride 2)
# --------------------------------------------------------------------------


def avg_pool_2x2_ceil(x):
  """``nn.AvgPool2d(2, 2, ceil_mode=True)`` on NHWC: ceil(H/2) x ceil(W/2) windows.

  A window that hangs over the bottom / right edge averages only its in-bounds
  pixels (PyTorch's divisor with padding 0).
  """
  batch, height, width, channels = x.shape
  h, w = -(-height // 2), -(-width // 2)
  x = jnp.pad(x, ((0, 0), (0, 2 * h - height), (0, 2 * w - width), (0, 0)))
  sums = x.reshape(batch, h, 2, w, 2, channels).sum((2, 4))
  rows = np.minimum(2 * np.arange(h) + 2, height) - 2 * np.arange(h)
  cols = np.minimum(2 * np.arange(w) + 2, width) - 2 * np.arange(w)
  counts = (rows[:, None] * cols[None, :]).astype(np.float32)
  return sums * jnp.asarray(1.0 / counts, x.dtype)[None, :, :, None]


def unfold(x):
  """``nn.Unfold(3, padding=1, stride=2)`` on NHWC: (N, ceil(H/2), ceil(W/2), 9, C).

  Slot k = 3 * ki + kj holds x_pad[2 i + ki, 2 j + kj] (x zero-padded by 1).
  """
  height, width = x.shape[1:3]
  h, w = -(-height // 2), -(-width // 2)
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  taps = [
    padded[:, ki : ki + 2 * h - 1 : 2, kj : kj + 2 * w - 1 : 2, :]
    for ki in range(3)
    for kj in range(3)
  ]
  return jnp.stack(taps, axis=3)


def fold(patches, size):
  """``F.fold(kernel 3, padding 1, stride 2)`` on (N, h, w, 9, C) -> (N, H, W, C).

  The linear transpose of ``unfold``: each patch slot is added back where it
  was read, overlapping contributions summed. Each slot's transpose of a
  strided slice is an interior pad (zeros between the rows) and an offset.
  """
  height, width = size
  batch, h, w, _, channels = patches.shape
  zero = jnp.zeros((), patches.dtype)
  out = None
  for ki in range(3):
    for kj in range(3):
      config = (
        (0, 0, 0),
        (ki, height + 2 - ki - (2 * h - 1), 1),
        (kj, width + 2 - kj - (2 * w - 1), 1),
        (0, 0, 0),
      )
      term = jax.lax.pad(patches[:, :, :, 3 * ki + kj], zero, config)
      out = term if out is None else out + term
  return out[:, 1 : height + 1, 1 : width + 1]


class CSA(nn.Module):
  """Convolutional self-attention (stage 1 of LVT), on an NHWC grid.

  For each 3x3 / stride-2 / pad-1 patch (one per 2x2 cell, ceil(H/2) x
  ceil(W/2) of them), a 9 x 9 attention matrix per head comes straight from a
  Linear layer on the 2x2 average pool of x (no queries/keys), scaled by
  head_dim**-0.5 and softmaxed over its last axis; values are the patch's nine
  pixels, each mapped by its own C x C matrix (a 1x1 conv in 9 groups, no
  bias); the attended patches are folded back (overlaps summed) and projected.
  """

  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch, height, width, channels = x.shape
    heads, head_dim = self.num_heads, channels // self.num_heads
    h, w = -(-height // 2), -(-width // 2)
    attn = dense(81 * heads, "attn", self.dtype, self.param_dtype)(avg_pool_2x2_ceil(x))
    attn = attn.reshape(batch, h, w, heads, 9, 9) * (head_dim**-0.5)
    attn = jax.nn.softmax(attn, axis=-1)
    # The grouped 1x1 conv's kernel, stored as flax stores a grouped conv: (1, 1, C, 9C);
    # output k*C + o of group k reads input k*C + i through kernel[0, 0, i, k*C + o].
    kernel = _GroupedPointwise(channels, self.param_dtype, name="weight")()
    patches, kernel, attn = nn.dtypes.promote_dtype(unfold(x), kernel, attn, dtype=self.dtype)
    per_slot = kernel[0, 0].reshape(channels, 9, channels)  # [i, k, o]
    v = jnp.einsum("bhwkc,cko->bhwko", patches, per_slot)
    v = v.reshape(batch, h, w, 9, heads, head_dim)
    out = jnp.einsum("bhwnij,bhwjnd->bhwind", attn, v).reshape(batch, h, w, 9, channels)
    out = fold(out, (height, width))
    return dense(channels, "proj", self.dtype, self.param_dtype)(out)


class _GroupedPointwise(nn.Module):
  """The kernel of CSA's 1x1 conv in 9 groups (9C -> 9C), no bias: (1, 1, C, 9C).

  Public init: normal with std sqrt(2 / (9 C)).
  """

  channels: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self):
    c = self.channels
    return self.param("kernel", init.conv_kernel(9 * c), (1, 1, c, 9 * c), self.param_dtype)


# --------------------------------------------------------------------------
# RASA: recursive atrous self-attention
# --------------------------------------------------------------------------


class AtrousDepthwise(nn.Module):
  """The public ``ds_conv2d`` as RASA uses it: ONE 3x3 depthwise kernel applied at
  each atrous rate (padding = rate), SiLU after each, the results summed.

  No bias (the public bias is qkv_bias, False in LVT). Public init:
  ``kaiming_uniform_`` (a=0, fan_in = 9): uniform in +-sqrt(6 / 9).
  """

  rates: Tuple[int, ...] = (1, 3, 5)
  kernels: str = "native"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    kernel = self.param(
      "kernel",
      nn.initializers.variance_scaling(2.0, "fan_in", "uniform"),
      (3, 3, 1, channels),
      self.param_dtype,
    )
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    out = None
    for rate in self.rates:
      y = nn.silu(kernels_lib.depthwise3x3(x, kernel, self.kernels, rate))
      out = y if out is None else out + y
    return out


class RecursiveAtrousAttention(nn.Module):
  """RASA on an NHWC grid.

  inner(x): q = ds(Linear(x)) (no bias; ``AtrousDepthwise`` on the grid); keys and
  values from kv = Linear(context) (no bias; first half k, second v), where
  context = LayerNorm(sr conv(x)) when sr > 1 (kernel = stride = sr, bias), else
  x; softmax(q k^T * head_dim**-0.5) v; proj Linear with bias.
  Recursion (r_num = ``recursions``): y = silu(inner(x)), then r_num - 1 times
  y = silu(inner(y + previous input)) -- for r_num 2: silu(inner(silu(inner(x)) + x)).
  With r_num 1: y = inner(x), no SiLU. Both passes share every parameter.
  """

  num_heads: int
  sr_ratio: int
  rates: Tuple[int, ...] = (1, 3, 5)
  recursions: int = 2
  kernels: str = "native"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    q = dense(channels, "q", self.dtype, self.param_dtype, use_bias=False)
    ds = (
      AtrousDepthwise(tuple(self.rates), self.kernels, self.dtype, self.param_dtype, name="ds")
      if self.rates
      else None
    )
    sr = norm = None
    if self.sr_ratio > 1:
      sr = PatchConv(channels, self.sr_ratio, self.dtype, self.param_dtype, self.kernels, name="sr")
      norm = layer_norm(EPS, "norm", self.dtype, self.param_dtype)
    kv = dense(2 * channels, "kv", self.dtype, self.param_dtype, use_bias=False)
    proj = dense(channels, "proj", self.dtype, self.param_dtype)

    def inner(x):
      batch, height, width, _ = x.shape
      head_dim = channels // self.num_heads
      queries = q(x)
      if ds is not None:
        queries = ds(queries)  # channel head * head_dim + d, as the public reshapes
      context = norm(sr(x)) if sr is not None else x
      keys, values = jnp.split(kv(context), 2, axis=-1)

      def split(t):
        return t.reshape(batch, -1, self.num_heads, head_dim)

      out = kernels_lib.attention(split(queries), split(keys), split(values), self.kernels)
      return proj(out.reshape(batch, height, width, channels))

    y = inner(x)
    if self.recursions > 1:
      y = nn.silu(y)
    previous = x
    for _ in range(self.recursions - 1):
      y = y + previous
      previous = y
      y = nn.silu(inner(y))
    return y


class Mlp(nn.Module):
  """Stage 1's MLP: Linear -> exact GELU -> Linear, on NHWC."""

  hidden: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    x = dense(self.hidden, "fc1", self.dtype, self.param_dtype)(x)
    x = gelu(x)
    return dense(channels, "fc2", self.dtype, self.param_dtype)(x)


class Block(nn.Module):
  """x + DropPath(attn(LN(x))), then x + DropPath(mlp(LN(x))), on the NHWC grid."""

  attention: str
  num_heads: int
  sr_ratio: int
  mlp_ratio: int
  depconv: bool
  rates: Tuple[int, ...] = (1, 3, 5)
  recursions: int = 2
  drop_path: float = 0.0
  kernels: str = "native"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    batch, height, width, channels = x.shape
    drop = nn.Dropout(self.drop_path, broadcast_dims=(1, 2, 3), rng_collection="dropout")
    y = layer_norm(EPS, "norm1", self.dtype, self.param_dtype)(x)
    if self.attention == "csa":
      y = CSA(self.num_heads, self.dtype, self.param_dtype, name="attn")(y)
    elif self.attention == "rasa":
      y = RecursiveAtrousAttention(
        self.num_heads,
        self.sr_ratio,
        tuple(self.rates),
        self.recursions,
        self.kernels,
        self.dtype,
        self.param_dtype,
        name="attn",
      )(y)
    else:
      raise ValueError(f"Unknown LVT attention {self.attention!r}; expected csa or rasa")
    x = x + drop(y, deterministic=not train)
    y = layer_norm(EPS, "norm2", self.dtype, self.param_dtype)(x)
    hidden = channels * self.mlp_ratio
    if self.depconv:
      y = MixFFN(hidden, self.kernels, self.dtype, self.param_dtype, name="mlp")(
        y.reshape(batch, height * width, channels), (height, width)
      )
      y = y.reshape(batch, height, width, channels)
    else:
      y = Mlp(hidden, self.dtype, self.param_dtype, name="mlp")(y)
    return x + drop(y, deterministic=not train)


class PatchEmbed(nn.Module):
  """Strided conv with bias; returns (LayerNorm'd NHWC map, the conv output as tokens)."""

  features: int
  kernel: int
  stride: int
  padding: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = patch_conv(self)(x)
    batch, height, width, channels = x.shape
    embedding = x.reshape(batch, height * width, channels)
    return layer_norm(EPS, "norm", self.dtype, self.param_dtype)(x), embedding


class LiteVisionTransformer(StageEncoder):
  """The LVT encoder. Returns (stage maps NHWC, patch embeddings N x T x C).

  Stage s: ``patch_embed{s}`` (its conv output, before the LayerNorm, is the stage's
  embedding), blocks ``block{s}_{j}`` on the NHWC map; no norm closes a stage.
  """

  variant: Any = "lvt"

  def row(self):
    return get_lvt_variant(self.variant)

  def embed(self, stage, spec, x):
    return patch_embed(PatchEmbed, stage, spec.channels[stage], self.dtype, self.param_dtype)(x)

  def block(self, stage, index, spec, drop_path, state, train):
    return self.block_class(Block, static_argnums=(2,))(
      spec.attention[stage],
      spec.heads[stage],
      spec.sr_ratios[stage],
      spec.mlp_ratios[stage],
      spec.mlp_depconv[stage],
      tuple(spec.atrous_rates),
      spec.recursions,
      drop_path,
      self.kernels,
      self.dtype,
      self.param_dtype,
      name=f"block{stage + 1}_{index}",
    )(state, train)


class LVT(SegmentationModel):
  """LVT encoder + SegFormer's all-MLP head (width 256, no dropout); outputs as ``SegFormer``'s."""

  variant: Any = "lvt"
  encoder_class = LiteVisionTransformer

  def row(self):
    return get_lvt_variant(self.variant)
