"""The Flax tree <-> the public PyTorch code: names (``torch_name``) and array layouts
(``to_flax_layout`` / ``to_torch_layout``), and a whole tree as a public state dict."""

import re
from typing import Dict, Tuple

import numpy as np
from flax import traverse_util

# Flax leaf -> PyTorch parameter / buffer.
LEAVES = {
  "kernel": "weight",
  "scale": "weight",
  "bias": "bias",
  "mean": "running_mean",
  "var": "running_var",
}


def _mit_name(parts) -> str:
  """MiT / SegFormer-head path parts (below encoder / head) -> the public flat name."""
  names = []
  for part in parts[:-1]:
    if re.fullmatch(r"block\d_\d+", part):
      part = part.replace("_", ".")
    elif part.startswith("linear_c"):
      part += ".proj"
    elif part == "linear_fuse":
      part = "linear_fuse.conv"
    elif part == "bn":
      part = "linear_fuse.bn"
    elif part == "dwconv":
      part = "dwconv.dwconv"
    names.append(part)
  return ".".join(names + [LEAVES[parts[-1]]])


def _lvt_encoder_name(parts) -> str:
  leaf = LEAVES[parts[-1]]
  match = re.fullmatch(r"(patch_embed|block)(\d)(?:_(\d+))?", parts[0])
  if match is None:
    raise ValueError(f"no public LVT name for encoder/{'/'.join(parts)}")
  stage = int(match[2]) - 1
  if match[1] == "patch_embed":
    return f"backbone.{stage}.0.{'.'.join(parts[1:-1])}.{leaf}"
  inner = ["depconv" if p == "dwconv" else p for p in parts[1:-1]]
  return f"backbone.{stage}.1.{match[3]}.{'.'.join(inner)}.{leaf}"


def torch_name(path: Tuple[str, ...], family: str = "segformer") -> str:
  """Public PyTorch name of a Flax leaf of ``family``'s model, e.g.

  ('params', 'encoder', 'block1_0', 'attn', 'kv', 'kernel') -> 'block1.0.attn.kv.weight'
  ('batch_stats', 'head', 'bn', 'mean') -> 'linear_fuse.bn.running_mean'
  PVTv2: 'backbone.block1.0.attn.kv.weight', 'neck.lateral_convs.0.conv.weight',
  'head.scale_heads.3.4.conv.weight' (our scale_heads_3_2), 'head.conv_seg.weight'.
  LVT: 'backbone.0.1.0.attn.weight.weight', 'backbone.1.1.0.mlp.depconv.weight',
  'linear_c1.proj.weight' (the head as SegFormer's).
  """
  _, top, *parts = path
  if family == "segformer" or (family == "lvt" and top == "head"):
    return _mit_name(parts)  # the public code is flat: no encoder / head level
  if family == "lvt" and top == "encoder":
    return _lvt_encoder_name(parts)
  if family == "pvtv2":
    leaf = LEAVES[parts[-1]]
    if top == "encoder":
      return "backbone." + _mit_name(parts)
    match = re.fullmatch(r"(lateral_convs|fpn_convs)_(\d)", parts[0])
    if top == "neck" and match and len(parts) == 2:
      return f"neck.{match[1]}.{match[2]}.conv.{leaf}"
    match = re.fullmatch(r"scale_heads_(\d)_(\d)", parts[0])
    if top == "head" and match and len(parts) == 2:
      # An Upsample follows each conv of a scale head in the public nn.Sequential.
      return f"head.scale_heads.{match[1]}.{2 * int(match[2])}.conv.{leaf}"
    if top == "head" and parts[0] == "conv_seg" and len(parts) == 2:
      return f"head.conv_seg.{leaf}"
  raise ValueError(f"no public {family} name for {'/'.join(path)}")


def to_flax_layout(array: np.ndarray, ndim: int) -> np.ndarray:
  """PyTorch -> Flax: Linear (out, in) -> (in, out); conv OIHW -> HWIO (depthwise
  (C, 1, 3, 3) -> (3, 3, 1, C), grouped (G C, C, 1, 1) -> (1, 1, C, G C)); a 1x1 conv
  (out, in, 1, 1) into a Dense kernel (``ndim`` 2) -> (in, out)."""
  if ndim == 2 and array.ndim == 4 and array.shape[2:] == (1, 1):
    return array[:, :, 0, 0].T
  if ndim == 2 and array.ndim == 2:
    return array.T
  if ndim == 4 and array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  return array


def to_torch_layout(array: np.ndarray) -> np.ndarray:
  """Flax (in, out) / (kh, kw, in, out) -> PyTorch (out, in[, kh, kw]): to_flax_layout's inverse."""
  if array.ndim == 2:
    return array.T
  if array.ndim == 4:
    return array.transpose(3, 2, 0, 1)
  return array


def torch_shape(shape: Tuple[int, ...]) -> Tuple[int, ...]:
  """The PyTorch shape of a Flax leaf's shape (to_torch_layout on shapes alone)."""
  shape = tuple(int(d) for d in shape)
  if len(shape) == 2:
    return shape[::-1]
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return shape


def to_public_state_dict(variables, family: str = "segformer") -> Dict[str, np.ndarray]:
  """{"params", "batch_stats"} of a ``family`` model -> {public name: float32 array, PyTorch
  layout}, the state dict the public code's model loads.

  Each BatchNorm also gets the ``num_batches_tracked`` counter PyTorch keeps
  (0: the Flax model does not count), which ``convert`` ignores again. LVT's
  Mix-FFN fc1 / fc2 are 1x1 convs there (out, in, 1, 1), Dense kernels here.
  """
  flat = traverse_util.flatten_dict(variables)
  conv_mlps = {path[:-2] for path in flat if family == "lvt" and path[-2:-1] == ("dwconv",)}
  out = {}
  for path, value in flat.items():
    name = torch_name(path, family)
    value = to_torch_layout(np.asarray(value, np.float32))
    if path[:-2] in conv_mlps and path[-2] in ("fc1", "fc2") and value.ndim == 2:
      value = value[:, :, None, None]
    out[name] = np.array(value, order="C")
    if name.endswith(".running_mean"):
      out[name[: -len("running_mean")] + "num_batches_tracked"] = np.zeros((), np.int64)
  return out
