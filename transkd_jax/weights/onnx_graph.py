"""Writing an ONNX graph by hand: a small builder and the layers the three families use.

    g = Graph()
    x = g.input("pixels", onnx.TensorProto.UINT8, ["batch", 3, "height", "width"])
    y = dense(g, x, params["q"], "encoder/block1_0/attn/q")
    g.output(y, onnx.TensorProto.FLOAT, [...])
    model = g.model(opset=18, metadata={...})

Activations are NHWC inside the graph (as in the Flax models), so a Dense layer is one
``MatMul`` over the last axis, LayerNorm one ``LayerNormalization``; convolutions, which
ONNX runs on NCHW, are wrapped in two ``Transpose`` nodes. Every node and weight is named
by the Flax module it comes from (``encoder/block1_0/attn/q``), so the graph reads like
the parameter tree. Shapes stay symbolic: every reshape copies the batch and spatial
dimensions (``Reshape`` with 0 / -1, or the ``Shape`` of a tensor of the same grid), and
every resize is by a whole factor (inputs are multiples of 32).

``onnx`` is imported by the caller (``transkd_jax.weights.onnx_models``) once it is
known to be installed.
"""

import hashlib

import numpy as np
import onnx
from onnx import helper, numpy_helper

NHWC_TO_NCHW = (0, 3, 1, 2)
NCHW_TO_NHWC = (0, 2, 3, 1)


class Graph:
  """Nodes, weights (initializers), inputs and outputs, each name used once."""

  def __init__(self):
    self.nodes, self.weights, self.inputs, self.outputs = [], [], [], []
    self._used = set()
    self._consts = {}
    self._stored = {}  # content -> name: a weight used twice (RASA's two passes) is stored once

  def _name(self, name: str) -> str:
    base, k = name, 1
    while name in self._used:
      k += 1
      name = f"{base}_{k}"
    self._used.add(name)
    return name

  def weight(self, value, name: str) -> str:
    """An initializer holding ``value`` (float32 unless it is an integer array); the same
    values asked for again return the first one's name."""
    value = np.asarray(value)
    value = value.astype(np.int64 if np.issubdtype(value.dtype, np.integer) else np.float32)
    key = (value.dtype.str, value.shape, hashlib.sha1(np.ascontiguousarray(value)).hexdigest())
    if key not in self._stored:
      self._stored[key] = self._name(name)
      self.weights.append(numpy_helper.from_array(value, self._stored[key]))
    return self._stored[key]

  def const(self, values, dtype=np.int64) -> str:
    """A small shared constant (shapes, axes, scales), named by its values."""
    key = (np.dtype(dtype).str, tuple(np.asarray(values).ravel().tolist()))
    if key not in self._consts:
      label = "_".join(str(v).replace("-", "m").replace(".", "p") for v in key[1])
      self._consts[key] = self.weight(np.asarray(values, dtype), f"const/{label or 'empty'}")
    return self._consts[key]

  def op(self, op_type: str, inputs, name: str, outputs: int = 1, **attrs):
    """Adds one node; returns its output name (or names, when ``outputs`` > 1)."""
    node_name = self._name(name)
    names = [node_name] if outputs == 1 else [f"{node_name}:{i}" for i in range(outputs)]
    self._used.update(names)
    self.nodes.append(helper.make_node(op_type, list(inputs), names, name=node_name, **attrs))
    return names[0] if outputs == 1 else names

  def input(self, name: str, elem_type, shape) -> str:
    self._used.add(name)
    self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
    return name

  def output(self, tensor: str, name: str, elem_type, shape) -> str:
    """Exposes ``tensor`` as graph output ``name`` (through an Identity)."""
    self._used.add(name)
    self.nodes.append(helper.make_node("Identity", [tensor], [name], name=f"output/{name}"))
    self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))
    return name

  def model(self, name: str, opset: int, metadata: dict) -> onnx.ModelProto:
    graph = helper.make_graph(self.nodes, name, self.inputs, self.outputs, self.weights)
    model = helper.make_model(
      graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="transkd_jax"
    )
    model.ir_version = 8  # opset 18's; onnxruntime >= 1.14 reads it
    helper.set_model_props(model, {k: str(v) for k, v in metadata.items()})
    return model


# --------------------------------------------------------------------------
# Layers. ``p`` is the module's parameter dict (numpy arrays, Flax names and layouts).
# --------------------------------------------------------------------------


def dense(g: Graph, x: str, p, name: str) -> str:
  """x @ kernel (+ bias) over the last axis."""
  y = g.op("MatMul", [x, g.weight(p["kernel"], f"{name}/kernel")], f"{name}/MatMul")
  if "bias" in p:
    y = g.op("Add", [y, g.weight(p["bias"], f"{name}/bias")], f"{name}/bias_add")
  return y


def pointwise(g: Graph, x: str, p, name: str) -> str:
  """A 1 x 1 ``nn.Conv`` (kernel 1 x 1 x in x out) as a Dense layer."""
  return dense(g, x, {**p, "kernel": np.asarray(p["kernel"])[0, 0]}, name)


def layer_norm(g: Graph, x: str, p, eps: float, name: str) -> str:
  return g.op(
    "LayerNormalization",
    [x, g.weight(p["scale"], f"{name}/scale"), g.weight(p["bias"], f"{name}/bias")],
    name,
    axis=-1,
    epsilon=float(eps),
  )


def conv(
  g: Graph, x: str, kernel, bias, name: str, stride=1, padding=0, dilation=1, groups=1
) -> str:
  """An NHWC map through an NCHW ``Conv`` (kernel HWIO as Flax stores it; bias or None)."""
  kernel = np.asarray(kernel)
  weight = g.weight(kernel.transpose(3, 2, 0, 1), f"{name}/kernel")  # HWIO -> OIHW
  inputs = [g.op("Transpose", [x], f"{name}/to_nchw", perm=NHWC_TO_NCHW), weight]
  if bias is not None:
    inputs.append(g.weight(bias, f"{name}/bias"))
  y = g.op(
    "Conv",
    inputs,
    name,
    kernel_shape=list(kernel.shape[:2]),
    strides=[stride, stride],
    pads=[padding] * 4,
    dilations=[dilation, dilation],
    group=groups,
  )
  return g.op("Transpose", [y], f"{name}/to_nhwc", perm=NCHW_TO_NHWC)


def depthwise3x3(g: Graph, x: str, kernel, bias, name: str, dilation: int = 1) -> str:
  """A 3x3 depthwise conv, stride 1, padding = dilation (kernel 3 x 3 x 1 x C)."""
  channels = np.asarray(kernel).shape[-1]
  return conv(g, x, kernel, bias, name, padding=dilation, dilation=dilation, groups=channels)


def gelu(g: Graph, x: str, name: str) -> str:
  """Exact GELU, x * (0.5 + 0.5 erf(x / sqrt 2)), as ``transkd_jax.models.mit.gelu``."""
  half = g.const(0.5, np.float32)
  e = g.op("Erf", [g.op("Mul", [x, g.const(2**-0.5, np.float32)], f"{name}/scale")], f"{name}/erf")
  phi = g.op("Add", [half, g.op("Mul", [half, e], f"{name}/half")], f"{name}/phi")
  return g.op("Mul", [x, phi], name)


def silu(g: Graph, x: str, name: str) -> str:
  return g.op("Mul", [x, g.op("Sigmoid", [x], f"{name}/sigmoid")], name)


def attention(g: Graph, q: str, k: str, v: str, heads: int, channels: int, grid: str, name: str):
  """softmax(q k^T / sqrt(d)) v per head. q: N x H x W x C, k and v: N x ... x C; the
  result takes ``grid``'s shape (a ``Shape`` output: N, H, W, C)."""
  d = channels // heads
  split = g.const([0, -1, heads, d])

  def heads_first(t, what, perm):
    t = g.op("Reshape", [t, split], f"{name}/{what}_heads")
    return g.op("Transpose", [t], f"{name}/{what}_heads_first", perm=perm)

  scores = g.op(
    "MatMul",
    [heads_first(q, "q", (0, 2, 1, 3)), heads_first(k, "k", (0, 2, 3, 1))],
    f"{name}/scores",
  )
  scores = g.op("Mul", [scores, g.const(d**-0.5, np.float32)], f"{name}/scaled")
  weights = g.op("Softmax", [scores], f"{name}/softmax", axis=-1)
  out = g.op("MatMul", [weights, heads_first(v, "v", (0, 2, 1, 3))], f"{name}/weighted")
  out = g.op("Transpose", [out], f"{name}/tokens_first", perm=(0, 2, 1, 3))
  return g.op("Reshape", [out, grid], f"{name}/to_grid")


def upsample(g: Graph, x: str, factor: int, mode: str, name: str) -> str:
  """An NHWC map resized by a whole ``factor`` as PyTorch's ``F.interpolate``:
  ``bilinear`` (align_corners=False) or ``nearest`` (source index floor(dst / factor))."""
  if factor == 1:
    return x
  attrs = (
    dict(mode="linear", coordinate_transformation_mode="pytorch_half_pixel")
    if mode == "bilinear"
    else dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
  )
  scales = g.const([1.0, factor, factor, 1.0], np.float32)
  return g.op("Resize", [x, "", scales], name, **attrs)
