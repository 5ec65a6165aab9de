"""The three families (SegFormer, PVTv2, LVT) as ONNX graphs, for deployment.

    model = onnx_model(variables, "segformer", spec, num_classes, "unit", argmax=True)

The graph is written node by node from the trained variables (``onnx_graph``), following
``transkd_jax/models/`` op for op in inference mode (no dropout; BatchNorm with its
running statistics, folded into the 1 x 1 projections before it), so every node carries
the name of the Flax module it computes.

Input ``pixels``: uint8 RGB, N x 3 x H x W, H and W multiples of 32 (batch, height and
width dynamic). The normalisation the weights were trained with (``unit``: / 255,
``imagenet``: mean / std) is the graph's first node, so a decoded image goes in as it
is and no caller can get it wrong; the model's metadata names it too. Outputs:
``logits``, float32, N x classes x H/4 x W/4; with ``argmax``, also ``labels``, uint8,
N x H x W: the logits resized bilinearly to the input size and arg-maxed, as
``--mode=predict`` does.
"""

import numpy as np
import onnx

from transkd_jax.models import mit
from transkd_jax.models.lvt import EPS as LVT_EPS
from transkd_jax.models.pvtv2 import FPN_HEAD_STRIDES
from transkd_jax.models.variants import PATCH_GEOMETRY
from transkd_jax.normalization import MEAN, STD
from transkd_jax.weights.onnx_graph import (
  NCHW_TO_NHWC,
  NHWC_TO_NCHW,
  Graph,
  attention,
  conv,
  dense,
  depthwise3x3,
  gelu,
  layer_norm,
  pointwise,
  silu,
  upsample,
)

OPSET = 18
BN_EPS = 1e-5


def _np(tree):
  """A variables tree with numpy leaves."""
  if isinstance(tree, dict) or hasattr(tree, "items"):
    return {k: _np(v) for k, v in tree.items()}
  return np.asarray(tree, np.float32)


# --------------------------------------------------------------------------
# Input and the encoders
# --------------------------------------------------------------------------


def _pixels(g: Graph, normalization: str) -> str:
  """uint8 NCHW pixels -> float32 NHWC, normalised as ``transkd_jax.normalization``."""
  x = g.input("pixels", onnx.TensorProto.UINT8, ["batch", 3, "height", "width"])
  x = g.op("Cast", [x], "input/float", to=onnx.TensorProto.FLOAT)
  x = g.op("Transpose", [x], "input/nhwc", perm=NCHW_TO_NHWC)
  if normalization == "unit":
    return g.op("Div", [x, g.const(255.0, np.float32)], "input/unit")
  x = g.op("Sub", [x, g.weight(MEAN, "input/mean")], "input/centre")
  return g.op("Div", [x, g.weight(STD, "input/std")], "input/imagenet")


def _patch_conv(g, x, p, stage, name):
  kernel, stride, padding = PATCH_GEOMETRY[stage]
  return conv(g, x, p["kernel"], p["bias"], name, stride=stride, padding=padding)


def _keys_values(g, context, kv, channels, name):
  """The kv Linear of the context, split as the public code splits it: keys first."""
  y = dense(g, context, kv, f"{name}/kv")
  return g.op("Split", [y, g.const([channels, channels])], f"{name}/kv_split", outputs=2, axis=-1)


def _efficient_attention(g, x, p, heads, sr_ratio, name):
  channels = p["q"]["kernel"].shape[0]
  q = dense(g, x, p["q"], f"{name}/q")
  context = x
  if sr_ratio > 1:
    sr = p["sr"]
    context = conv(g, x, sr["kernel"], sr["bias"], f"{name}/sr", stride=sr_ratio)
    context = layer_norm(g, context, p["norm"], mit.EPS_PATCH, f"{name}/norm")
  k, v = _keys_values(g, context, p["kv"], channels, name)
  grid = g.op("Shape", [x], f"{name}/grid")
  out = attention(g, q, k, v, heads, channels, grid, name)
  return dense(g, out, p["proj"], f"{name}/proj")


def _mix_ffn(g, x, p, name):
  y = dense(g, x, p["fc1"], f"{name}/fc1")
  y = depthwise3x3(g, y, p["dwconv"]["kernel"], p["dwconv"]["bias"], f"{name}/dwconv")
  return dense(g, gelu(g, y, f"{name}/gelu"), p["fc2"], f"{name}/fc2")


def mit_encoder(g: Graph, x: str, p, spec) -> list:
  """MiT (SegFormer's and PVTv2's encoder) on an NHWC map -> the four stage maps."""
  features = []
  for s in range(4):
    embed = p[f"patch_embed{s + 1}"]
    x = _patch_conv(g, x, embed["proj"], s, f"encoder/patch_embed{s + 1}/proj")
    x = layer_norm(g, x, embed["norm"], mit.EPS_PATCH, f"encoder/patch_embed{s + 1}/norm")
    for j in range(spec.depths[s]):
      name = f"encoder/block{s + 1}_{j}"
      b = p[f"block{s + 1}_{j}"]
      y = layer_norm(g, x, b["norm1"], mit.EPS_BLOCK, f"{name}/norm1")
      y = _efficient_attention(g, y, b["attn"], spec.heads[s], spec.sr_ratios[s], f"{name}/attn")
      x = g.op("Add", [x, y], f"{name}/attn_residual")
      y = layer_norm(g, x, b["norm2"], mit.EPS_BLOCK, f"{name}/norm2")
      x = g.op("Add", [x, _mix_ffn(g, y, b["mlp"], f"{name}/mlp")], f"{name}/mlp_residual")
    x = layer_norm(g, x, p[f"norm{s + 1}"], mit.EPS_BLOCK, f"encoder/norm{s + 1}")
    features.append(x)
  return features


def _csa(g, x, p, heads, name):
  """LVT's convolutional self-attention (``transkd_jax.models.lvt.CSA``) on an even grid."""
  channels = p["proj"]["kernel"].shape[0]
  grid = g.op("Shape", [x], f"{name}/grid")
  # 2x2 average pool (the grid is even: ceil mode changes nothing) -> 9 x 9 weights per head.
  pooled = g.op("Transpose", [x], f"{name}/pool/to_nchw", perm=NHWC_TO_NCHW)
  pooled = g.op("AveragePool", [pooled], f"{name}/pool", kernel_shape=[2, 2], strides=[2, 2])
  pooled = g.op("Transpose", [pooled], f"{name}/pool/to_nhwc", perm=NCHW_TO_NHWC)
  weights = dense(g, pooled, p["attn"], f"{name}/attn")
  weights = g.op("Reshape", [weights, g.const([0, 0, 0, heads, 9, 9])], f"{name}/attn/heads")
  weights = g.op("Mul", [weights, g.const((channels // heads) ** -0.5, np.float32)], f"{name}/sc")
  weights = g.op("Softmax", [weights], f"{name}/softmax", axis=-1)
  # Unfold (3x3, padding 1, stride 2) as a grouped conv with one-hot kernels: output
  # channel 9 c + k is slot k (= 3 ki + kj) of channel c.
  one_hot = np.zeros((3, 3, 1, 9 * channels), np.float32)
  for k in range(9):
    one_hot[k // 3, k % 3, 0, k::9] = 1.0
  patches = conv(g, x, one_hot, None, f"{name}/unfold", stride=2, padding=1, groups=channels)
  patches = g.op("Reshape", [patches, g.const([0, 0, 0, channels, 9])], f"{name}/unfold/split")
  patches = g.op("Transpose", [patches], f"{name}/unfold/slots", perm=(0, 1, 2, 4, 3))
  # Values: slot k's pixels through its own C x C matrix (the 1x1 conv in 9 groups).
  per_slot = p["weight"]["kernel"][0, 0].reshape(channels, 9, channels).transpose(1, 0, 2)
  v = g.op("Unsqueeze", [patches, g.const([4])], f"{name}/v/rows")
  v = g.op("MatMul", [v, g.weight(per_slot, f"{name}/weight/kernel")], f"{name}/v")
  v = g.op("Reshape", [v, g.const([0, 0, 0, 9, heads, channels // heads])], f"{name}/v/heads")
  v = g.op("Transpose", [v], f"{name}/v/heads_first", perm=(0, 1, 2, 4, 3, 5))
  out = g.op("MatMul", [weights, v], f"{name}/weighted")  # N h w heads 9 d
  out = g.op("Transpose", [out], f"{name}/slots_first", perm=(0, 1, 2, 4, 3, 5))
  # Fold: the transpose of the unfold, a grouped transposed conv with the same kernels.
  out = g.op("Reshape", [out, g.const([0, 0, 0, 9, channels])], f"{name}/slots")
  out = g.op("Transpose", [out], f"{name}/channels_first_slots", perm=(0, 1, 2, 4, 3))
  out = g.op("Reshape", [out, g.const([0, 0, 0, 9 * channels])], f"{name}/patches")
  out = g.op("Transpose", [out], f"{name}/fold/to_nchw", perm=NHWC_TO_NCHW)
  fold = g.weight(one_hot.transpose(3, 2, 0, 1), f"{name}/fold/kernel")  # (9C, 1, 3, 3)
  out = g.op(
    "ConvTranspose",
    [out, fold],
    f"{name}/fold",
    kernel_shape=[3, 3],
    strides=[2, 2],
    pads=[1, 1, 1, 1],
    output_padding=[1, 1],
    group=channels,
  )
  out = g.op("Transpose", [out], f"{name}/fold/to_nhwc", perm=NCHW_TO_NHWC)
  out = g.op("Reshape", [out, grid], f"{name}/fold/grid")
  return dense(g, out, p["proj"], f"{name}/proj")


def _rasa(g, x, p, spec, stage, name):
  """LVT's recursive atrous self-attention (``RecursiveAtrousAttention``)."""
  channels = p["q"]["kernel"].shape[0]
  heads, sr_ratio = spec.heads[stage], spec.sr_ratios[stage]

  def inner(x, k):
    at = f"{name}/pass{k}"
    grid = g.op("Shape", [x], f"{at}/grid")
    q = dense(g, x, p["q"], f"{at}/q")
    if spec.atrous_rates:
      terms = [
        silu(g, depthwise3x3(g, q, p["ds"]["kernel"], None, f"{at}/ds_{r}", r), f"{at}/ds_{r}/act")
        for r in spec.atrous_rates
      ]
      q = terms[0]
      for i, t in enumerate(terms[1:]):
        q = g.op("Add", [q, t], f"{at}/ds_sum{i}")
    context = x
    if sr_ratio > 1:
      sr = p["sr"]
      context = conv(g, x, sr["kernel"], sr["bias"], f"{at}/sr", stride=sr_ratio)
      context = layer_norm(g, context, p["norm"], LVT_EPS, f"{at}/norm")
    k_, v_ = _keys_values(g, context, p["kv"], channels, at)
    out = attention(g, q, k_, v_, heads, channels, grid, at)
    return dense(g, out, p["proj"], f"{at}/proj")

  y = inner(x, 1)
  if spec.recursions > 1:
    y = silu(g, y, f"{name}/pass1/act")
  previous = x
  for k in range(2, spec.recursions + 1):
    y = g.op("Add", [y, previous], f"{name}/pass{k}/input")
    previous = y
    y = silu(g, inner(y, k), f"{name}/pass{k}/act")
  return y


def lvt_encoder(g: Graph, x: str, p, spec) -> list:
  features = []
  for s in range(4):
    embed = p[f"patch_embed{s + 1}"]
    x = _patch_conv(g, x, embed["proj"], s, f"encoder/patch_embed{s + 1}/proj")
    x = layer_norm(g, x, embed["norm"], LVT_EPS, f"encoder/patch_embed{s + 1}/norm")
    for j in range(spec.depths[s]):
      name = f"encoder/block{s + 1}_{j}"
      b = p[f"block{s + 1}_{j}"]
      y = layer_norm(g, x, b["norm1"], LVT_EPS, f"{name}/norm1")
      if spec.attention[s] == "csa":
        y = _csa(g, y, b["attn"], spec.heads[s], f"{name}/attn")
      else:
        y = _rasa(g, y, b["attn"], spec, s, f"{name}/attn")
      x = g.op("Add", [x, y], f"{name}/attn_residual")
      y = layer_norm(g, x, b["norm2"], LVT_EPS, f"{name}/norm2")
      if spec.mlp_depconv[s]:
        y = _mix_ffn(g, y, b["mlp"], f"{name}/mlp")
      else:
        mlp = b["mlp"]
        y = dense(g, gelu(g, dense(g, y, mlp["fc1"], f"{name}/mlp/fc1"), f"{name}/mlp/gelu"),
                  mlp["fc2"], f"{name}/mlp/fc2")  # fmt: skip
      x = g.op("Add", [x, y], f"{name}/mlp_residual")
    features.append(x)
  return features


# --------------------------------------------------------------------------
# The decoders
# --------------------------------------------------------------------------


def segformer_head(g: Graph, features, p, stats) -> str:
  """SegFormer's all-MLP head in the order ``models.head.SegFormerHead`` computes it:
  each stage's ``linear_c`` composed with its block of ``linear_fuse`` (and here the
  BatchNorm's scale) at the stage's resolution, upsampled and summed; then the
  BatchNorm's shift, ReLU, ``linear_pred``."""
  fuse = p["linear_fuse"]["kernel"][0, 0].astype(np.float64)
  width = fuse.shape[1]
  bn, running = p["bn"], stats["bn"]
  scale = bn["scale"].astype(np.float64) / np.sqrt(running["var"].astype(np.float64) + BN_EPS)
  shift = bn["bias"] - running["mean"] * scale
  x = None
  for slot, stage in enumerate((3, 2, 1, 0)):
    c = p[f"linear_c{stage + 1}"]
    block = fuse[slot * width : (slot + 1) * width] * scale
    name = f"head/linear_c{stage + 1}"
    y = dense(g, features[stage], {"kernel": c["kernel"] @ block, "bias": c["bias"] @ block}, name)
    y = upsample(g, y, 2**stage, "bilinear", f"{name}/upsample")
    x = y if x is None else g.op("Add", [x, y], f"head/sum_c{stage + 1}")
  x = g.op("Add", [x, g.weight(shift, "head/bn/shift")], "head/bn")
  x = g.op("Relu", [x], "head/relu")
  return pointwise(g, x, p["linear_pred"], "head/linear_pred")


def fpn_decoder(g: Graph, features, p) -> str:
  """PVTv2's FPN neck and semantic-FPN head (``models.pvtv2.FPN`` / ``FPNHead``)."""
  neck, head = p["neck"], p["head"]
  laterals = [
    pointwise(g, x, neck[f"lateral_convs_{i}"], f"neck/lateral_convs_{i}")
    for i, x in enumerate(features)
  ]
  for i in range(len(laterals) - 1, 0, -1):
    up = upsample(g, laterals[i], 2, "nearest", f"neck/top_down_{i}")
    laterals[i - 1] = g.op("Add", [laterals[i - 1], up], f"neck/lateral_sum_{i - 1}")
  outs = []
  for i, x in enumerate(laterals):
    q = neck[f"fpn_convs_{i}"]
    outs.append(conv(g, x, q["kernel"], q["bias"], f"neck/fpn_convs_{i}", padding=1))
  output = None
  for i, (x, stride) in enumerate(zip(outs, FPN_HEAD_STRIDES)):
    length = max(1, int(np.log2(stride) - np.log2(FPN_HEAD_STRIDES[0])))
    for k in range(length):
      name = f"head/scale_heads_{i}_{k}"
      q = head[f"scale_heads_{i}_{k}"]
      x = g.op("Relu", [conv(g, x, q["kernel"], q["bias"], name, padding=1)], f"{name}/relu")
      if stride != FPN_HEAD_STRIDES[0]:
        x = upsample(g, x, 2, "bilinear", f"{name}/upsample")
    output = x if output is None else g.op("Add", [output, x], f"head/sum_{i}")
  return pointwise(g, output, head["conv_seg"], "head/conv_seg")


# --------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------


def onnx_model(
  variables, family: str, spec, num_classes: int, normalization: str, argmax=False, metadata=None
) -> onnx.ModelProto:
  """The ONNX model of a family's trained ``variables`` (a Flax variables tree)."""
  params = _np(variables["params"])
  g = Graph()
  x = _pixels(g, normalization)
  if family == "lvt":
    features = lvt_encoder(g, x, params["encoder"], spec)
  else:
    features = mit_encoder(g, x, params["encoder"], spec)
  if family == "pvtv2":
    logits = fpn_decoder(g, features, params)
  else:
    logits = segformer_head(g, features, params["head"], _np(variables["batch_stats"]["head"]))
  nchw = g.op("Transpose", [logits], "logits/nchw", perm=NHWC_TO_NCHW)
  g.output(nchw, "logits", onnx.TensorProto.FLOAT, ["batch", num_classes, "height/4", "width/4"])
  if argmax:
    full = upsample(g, logits, 4, "bilinear", "labels/upsample")
    ids = g.op("ArgMax", [full], "labels/argmax", axis=-1, keepdims=0)
    ids = g.op("Cast", [ids], "labels/uint8", to=onnx.TensorProto.UINT8)
    g.output(ids, "labels", onnx.TensorProto.UINT8, ["batch", "height", "width"])
  meta = {"normalization": normalization, "num_classes": num_classes, **(metadata or {})}
  return g.model(f"transkd_jax_{family}", OPSET, meta)
