"""PVTv2 = the PVTv2 encoder + an FPN neck + the semantic-FPN head, NHWC, as in TransKD.

    model = PVTv2(variant="b2", num_classes=19)
    variables = model.init(jax.random.key(0), images)           # params only
    out = model.apply(variables, images)
    out["logits"]      # N x H/4 x W/4 x classes (float32)
    out["features"]    # four stage maps (after each stage's LayerNorm), NHWC
    out["embeddings"]  # four patch-embedding outputs (after their LayerNorm), N x tokens x C

The PVTv2 encoder of the public code (``pvt_v2_b*``) is the Mix Transformer
encoder with per-stage Mix-FFN ratios: the same overlapping patch embeddings
(7/4/3 then 3/2/1, LayerNorm eps 1e-5), the same blocks (efficient
self-attention with a kernel = stride = sr conv and a LayerNorm eps 1e-5 on
the reduced keys, q/kv with bias, Mix-FFN with a 3x3 depthwise conv and exact
GELU, block norms eps 1e-6), the same stage norms (eps 1e-6), drop path 0.1.
So ``encoder`` is ``transkd_jax.models.mit.MixTransformer`` given a row of
``PVT_VARIANTS``; its parameter names are MiT's (patch_embed1, block1_0,
norm1, ...) and the public names (``backbone.block1.0.attn.kv.weight``) map
to them by the same rename as SegFormer's.

The neck is mmdet's ``FPN(in_channels, 256, num_outs=4)`` (no norm, no
activation) and the head the public ``FPNHead(num_classes)`` (channels 128,
strides 4/8/16/32, no norm). There is no BatchNorm anywhere: the variables
hold ``params`` only.

Public names -> ours (torch OIHW conv weights -> flax HWIO kernels):

    backbone.<MiT name>                      encoder/<MiT name> (as SegFormer's encoder)
    neck.lateral_convs.{i}.conv.{weight,bias}   neck/lateral_convs_{i}/{kernel,bias}   1x1
    neck.fpn_convs.{i}.conv.{weight,bias}       neck/fpn_convs_{i}/{kernel,bias}       3x3
    head.scale_heads.{i}.{j}.conv.{weight,bias} head/scale_heads_{i}_{k}/{kernel,bias} 3x3,
        k-th conv of scale head i: j = 2k for i > 0 (an Upsample sits after each conv),
        j = 0 for i = 0
    head.conv_seg.{weight,bias}                 head/conv_seg/{kernel,bias}            1x1

Variant rows are ``MiTVariant`` rows: ``decoder_width`` holds the FPN neck's
width (256) and ``head_dropout`` the FPN head's channel dropout (0.1); the
head's own width (128) is ``FPN_HEAD_CHANNELS``.
"""

from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from transkd_jax.models import initializers as init
from transkd_jax.models.base import SegmentationModel
from transkd_jax.models.mit import MixTransformer
from transkd_jax.models.resize import resize_bilinear, resize_nearest
from transkd_jax.models.variants import MiTVariant, lookup_row

Dtype = Any

FPN_WIDTH = 256  # FPN(out_channels=256)
FPN_HEAD_CHANNELS = 128  # FPNHead(channels=128)
FPN_HEAD_STRIDES = (4, 8, 16, 32)

_WIDE = (64, 128, 320, 512)
_HEADS = (1, 2, 5, 8)


def _row(channels, depths, mlp_ratios=(8, 8, 4, 4)):
  # heads, sr ratios (8, 4, 2, 1), drop path 0.1 and qkv bias are shared by every row.
  return MiTVariant(
    channels,
    depths,
    _HEADS,
    decoder_width=FPN_WIDTH,
    mlp_ratios=mlp_ratios,
    sr_ratios=(8, 4, 2, 1),
    drop_path_rate=0.1,
    head_dropout=0.1,
  )


# The public code's pvt_v2_b0 .. pvt_v2_b5 (train/models/pvtv2/backbone.py).
PVT_VARIANTS = {
  "b0": _row((32, 64, 160, 256), (2, 2, 2, 2)),
  "b1": _row(_WIDE, (2, 2, 2, 2)),
  "b2": _row(_WIDE, (3, 4, 6, 3)),
  "b3": _row(_WIDE, (3, 4, 18, 3)),
  "b4": _row(_WIDE, (3, 8, 27, 3)),
  "b5": _row(_WIDE, (3, 6, 40, 3), mlp_ratios=(4, 4, 4, 4)),
}


def get_pvt_variant(name) -> MiTVariant:
  """The row for ``name`` ('b0'..'b5' or 'pvt_v2_b0'..'pvt_v2_b5'); a MiTVariant passes through."""
  return lookup_row(name, PVT_VARIANTS, MiTVariant, "PVTv2", "pvt_v2_")


def _conv(features, size, name, dtype, param_dtype, kernel_init=None, bias_init=None):
  """A conv with bias, stride 1, 'same' padding (size // 2); mmcv ConvModule's init by default.

  mmcv's ConvModule.init_weights: kaiming normal, mode fan_out, nonlinearity relu
  (also when there is no activation), bias 0: std sqrt(2 / (k * k * out)).
  """
  p = size // 2
  return nn.Conv(
    features,
    (size, size),
    padding=((p, p), (p, p)),
    kernel_init=kernel_init or init.conv_kernel(size * size * features),
    bias_init=bias_init or nn.initializers.zeros,
    dtype=dtype,
    param_dtype=param_dtype,
    name=name,
  )


class FPN(nn.Module):
  """mmdet's FPN with four inputs and four outputs, no norm, no activation, no extra levels.

  lateral_i = 1x1 conv (bias) of input i; top-down from the coarsest level:
  lateral_{i-1} += nearest-resize(lateral_i) to lateral_{i-1}'s size (PyTorch's
  legacy 'nearest': source index floor(dst * in / out)); out_i = 3x3 conv (pad 1,
  bias) of lateral_i.
  """

  width: int = FPN_WIDTH
  kernels: str = "native"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jnp.ndarray]):
    laterals = [
      _conv(self.width, 1, f"lateral_convs_{i}", self.dtype, self.param_dtype)(x)
      for i, x in enumerate(features)
    ]
    for i in range(len(laterals) - 1, 0, -1):
      laterals[i - 1] = laterals[i - 1] + resize_nearest(
        laterals[i], laterals[i - 1].shape[1:3], self.kernels
      )
    return tuple(
      _conv(self.width, 3, f"fpn_convs_{i}", self.dtype, self.param_dtype)(x)
      for i, x in enumerate(laterals)
    )


class FPNHead(nn.Module):
  """The semantic-FPN head (Panoptic FPN) of the public code, no norm.

  Scale head i: max(1, log2(stride_i / 4)) times [3x3 conv (bias) + ReLU, then
  a bilinear x2 upsample (align_corners False) unless stride_i = 4]. The four
  outputs are summed, each later one bilinear-resized to the first's size (the
  identity when the sizes agree); channel dropout (Dropout2d); 1x1 conv with
  bias to the classes.
  """

  num_classes: int
  channels: int = FPN_HEAD_CHANNELS
  dropout: float = 0.1
  strides: Sequence[int] = FPN_HEAD_STRIDES
  kernels: str = "native"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jnp.ndarray], train: bool = False):
    output = None
    for i, (x, stride) in enumerate(zip(features, self.strides)):
      length = max(1, int(np.log2(stride) - np.log2(self.strides[0])))
      for k in range(length):
        x = _conv(self.channels, 3, f"scale_heads_{i}_{k}", self.dtype, self.param_dtype)(x)
        x = nn.relu(x)
        if stride != self.strides[0]:
          x = resize_bilinear(x, (2 * x.shape[1], 2 * x.shape[2]), self.kernels)
      output = x if output is None else output + resize_bilinear(x, output.shape[1:3], self.kernels)
    # Dropout2d: whole channels, per sample.
    output = nn.Dropout(self.dropout, broadcast_dims=(1, 2))(output, deterministic=not train)
    # The public FPNHead is a plain nn.Module (not mmseg's BaseDecodeHead, whose
    # init_weights draws conv_seg from normal(0, 0.01)) and nothing re-initialises
    # it, so conv_seg keeps PyTorch's default Conv2d initialisation.
    return _conv(
      self.num_classes,
      1,
      "conv_seg",
      self.dtype,
      self.param_dtype,
      kernel_init=init.torch_default_kernel,
      bias_init=init.torch_default_bias(self.channels),
    )(output)


class PVTv2(SegmentationModel):
  """PVTv2 encoder + FPN + FPNHead; outputs as ``SegFormer``'s."""

  variant: Any = "b0"
  encoder_class = MixTransformer

  def row(self):
    return get_pvt_variant(self.variant)

  def make_decoder(self, spec):
    neck = FPN(spec.decoder_width, self.kernels, self.dtype, self.param_dtype)
    head = FPNHead(
      self.num_classes,
      FPN_HEAD_CHANNELS,
      spec.head_dropout,
      FPN_HEAD_STRIDES,
      self.kernels,
      self.dtype,
      self.param_dtype,
    )
    return {"neck": neck, "head": head}

  def decode(self, features, train: bool = False):
    return self.head(self.neck(features), train)
