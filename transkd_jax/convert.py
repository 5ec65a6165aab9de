"""Import the weights people already have into an Orbax checkpoint of our models.

    python -m transkd_jax.convert --input=PATH --arch=ARCH --output=DIR [--num-classes=19]

``--arch``: ``mit_b0`` .. ``mit_b5`` (SegFormer), ``pvt_v2_b0`` .. ``pvt_v2_b5``
(PVTv2 + FPN neck + semantic-FPN head) or ``lvt`` (LVT + SegFormer head).

Reads PyTorch state dicts (``.pth``, ``.pth.tar``, ``.pt``, ``.bin``; needs
torch; optionally under ``state_dict`` / ``model``, with DataParallel's
``module.`` and the distillation wrapper's ``student.`` prefixes, whose other
modules (CSF, PEA, ...) are dropped and listed) and HuggingFace directories
written by ``save_pretrained`` (``model.safetensors`` or ``pytorch_model.bin``;
safetensors needs no torch):

  SegFormer  the official ImageNet encoders (mit_b0.pth ...), SegFormer / mmseg
             checkpoints (``backbone.`` / ``decode_head.``), the public TransKD
             code's SegFormers, HuggingFace ``SegformerForSemanticSegmentation``
             / ``SegformerModel``;
  PVTv2      the official ImageNet encoders (pvt_v2_b0.pth ...: flat
             ``patch_embed1.`` / ``block1.0.`` / ``norm1.`` names; the ImageNet
             classifier ``head.`` is dropped), HuggingFace ``PvtV2Model`` /
             ``PvtV2ForImageClassification``, the public code's PVTv2 teachers
             and students (``backbone.``, ``neck.``, ``head.``);
  LVT        the ImageNet encoder (lvt_imagenet_pretrained.pth.tar:
             ``backbone.{stage}.0.`` / ``backbone.{stage}.1.{block}.``; a
             classifier's ``norm.`` / ``head.`` are dropped) and the public
             code's LVT students (the same plus the SegFormer head's
             ``linear_c*`` / ``linear_fuse`` / ``linear_pred``).

A bare encoder gets a freshly initialised decoder (SegFormer / LVT: the head;
PVTv2: the neck and the head) from ``--seed``. A 20-way head (the public code's
20th class is the ignore label) becomes 19 classes with ``--num-classes=19``.

Writes ``DIR`` with ``orbax.checkpoint.StandardCheckpointer``: the plain pytree
``{"params": ..., "batch_stats": ...}`` of the model (PVTv2 has no BatchNorm:
its batch_stats are empty), plus ``DIR/transkd_convert.json`` saying what it
holds (arch, family and variant as ``transkd_jax.models.archs`` names them,
classes, source, its layout and the input normalisation that layout's code
uses). Names are first brought to the public PyTorch code's names
(``block1.0.attn.kv.weight``, ``backbone.block1.0...``, ``backbone.0.1.0...``),
then mapped onto the Flax tree, whose names follow the same code (the tables
are in transkd_jax/models/pvtv2.py and lvt.py). ``transkd_jax.export`` goes the
other way with the same name tables.
"""

import argparse
import functools
import json
import os
import re
import sys
from typing import Any, Dict, Tuple

import numpy as np
from flax import traverse_util

from transkd_jax.errors import UserError
from transkd_jax.models.lvt import LVT_VARIANTS, LVTVariant, get_lvt_variant
from transkd_jax.models.pvtv2 import PVT_VARIANTS, get_pvt_variant
from transkd_jax.models.variants import VARIANTS, MiTVariant, get_variant
from transkd_jax.normalization import CONVERT_RECORD, NORMALIZATIONS

IGNORE_LABEL_ROW = 19  # the public code's 20th class: the ignore label, loss weight 0
META_FILE = CONVERT_RECORD
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".tar", ".ckpt")
FAMILIES = ("segformer", "pvtv2", "lvt")  # transkd_jax.models.archs.ARCHS' names
ARCH_NAMES = [f"mit_b{i}" for i in range(6)] + [f"pvt_v2_b{i}" for i in range(6)] + ["lvt"]


# --------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------


def _read_safetensors(path: str) -> Dict[str, np.ndarray]:
  from safetensors.numpy import load_file

  try:
    return dict(load_file(path))
  except Exception as e:  # safetensors raises its own error types
    raise UserError(f"{path}: not a readable safetensors file ({e})") from None


def _read_torch(path: str) -> Dict[str, np.ndarray]:
  try:
    import torch
  except ImportError:
    raise UserError(
      f"{path}: reading PyTorch checkpoints needs torch (pip install -e \".[torch]\"); "
      "safetensors files need no torch"
    ) from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise UserError(
      f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: "
      f"{str(e).splitlines()[0] if str(e) else ''})"
    ) from None
  for key in ("state_dict", "model", "module"):
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      obj = obj[key]
      break
  if not isinstance(obj, dict) or not any(torch.is_tensor(v) for v in obj.values()):
    raise UserError(
      f"{path}: expected a state dict (names -> tensors), possibly under "
      f"'state_dict' or 'model'; found {type(obj).__name__}"
    )
  return {
    k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
    for k, v in obj.items()
    if torch.is_tensor(v)
  }


def _read_index(path: str, reader) -> Dict[str, np.ndarray]:
  """A sharded HuggingFace checkpoint (``*.index.json``)."""
  with open(path) as f:
    shards = sorted(set(json.load(f)["weight_map"].values()))
  out = {}
  for shard in shards:
    out.update(reader(os.path.join(os.path.dirname(path), shard)))
  return out


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
  """Tensors of a checkpoint file or HuggingFace directory, as numpy arrays."""
  if not os.path.exists(path):
    raise UserError(f"--input {path}: no such file or directory")
  if os.path.isdir(path):
    for name, reader in (
      ("model.safetensors", _read_safetensors),
      ("model.safetensors.index.json", lambda p: _read_index(p, _read_safetensors)),
      ("pytorch_model.bin", _read_torch),
      ("pytorch_model.bin.index.json", lambda p: _read_index(p, _read_torch)),
    ):
      if os.path.exists(os.path.join(path, name)):
        return reader(os.path.join(path, name))
    raise UserError(
      f"--input {path}: a directory, but it holds none of model.safetensors, "
      "pytorch_model.bin (or their .index.json): expected a HuggingFace "
      "save_pretrained directory"
    )
  if path.endswith(".safetensors"):
    return _read_safetensors(path)
  if path.endswith(".index.json"):
    reader = _read_safetensors if "safetensors" in path else _read_torch
    return _read_index(path, reader)
  if path.endswith(TORCH_SUFFIXES):
    return _read_torch(path)
  raise UserError(
    f"--input {path}: unknown checkpoint type; expected a .safetensors file, a "
    f"PyTorch file ({', '.join(TORCH_SUFFIXES)}) or a HuggingFace directory"
  )


# --------------------------------------------------------------------------
# The architecture: --arch -> (family, variant row)
# --------------------------------------------------------------------------

LABELS = {"segformer": "SegFormer", "pvtv2": "PVTv2", "lvt": "LVT"}  # for messages


def resolve_arch(arch, family=None) -> Tuple[str, Any, str, str]:
  """(family, variant row, variant name, arch name) of ``--arch``.

  ``arch``: mit_b0 .. mit_b5 (or b0 .. b5), pvt_v2_b0 .. pvt_v2_b5, lvt; or a
  variant row (a MiTVariant: SegFormer unless ``family="pvtv2"``; an
  LVTVariant), for which both names are "custom". Raises UserError naming the
  accepted values.
  """
  if isinstance(arch, LVTVariant):
    return "lvt", arch, "custom", "custom LVT"
  if isinstance(arch, MiTVariant):
    family = family or "segformer"
    if family not in ("segformer", "pvtv2"):
      raise ValueError(f"a MiTVariant row is a SegFormer or PVTv2 variant, not {family!r}")
    return family, arch, "custom", f"custom {LABELS[family]}"
  key = str(arch).lower()
  accepted = "mit_b0 .. mit_b5, pvt_v2_b0 .. pvt_v2_b5, lvt"
  try:
    if key.startswith("pvt_v2_"):
      name = key[len("pvt_v2_") :]
      return "pvtv2", get_pvt_variant(name), name, f"pvt_v2_{name}"
    if key.startswith("lvt"):
      return "lvt", get_lvt_variant(key), key, key
    if key.startswith("mit_") or re.fullmatch(r"b\d+", key):
      name = key.removeprefix("mit_")
      return "segformer", get_variant(name), name, f"mit_{name}"
  except ValueError as e:
    raise UserError(f"--arch={arch}: {e} Accepted: {accepted}") from None
  raise UserError(f"--arch={arch}: unknown architecture; expected one of {accepted}")


def model_label(family: str, arch_name: str) -> str:
  """ "PVTv2 pvt_v2_b0", "SegFormer mit_b2", "LVT lvt" (for messages)."""
  return f"{LABELS[family]} {arch_name}"


# --------------------------------------------------------------------------
# Names: everything <-> the public PyTorch code's names
# --------------------------------------------------------------------------

# HuggingFace transformers' names <-> the public code's names, as (HF, public)
# pairs; in a prefix, {i} is a stage 0-3 (the public code counts {s} = 1-4) and
# {j} a block. Two HF schemes: the names save_pretrained writes (FILE: read and
# written), and the names transformers 5 uses in memory, which a
# torch.save(model.state_dict()) holds (MEMORY: read only). The public code's
# kv layer is k and v apart in HF: see _hf_to_public / public_to_hf.
_HF_FILE_PREFIXES = [
  ("encoder.patch_embeddings.{i}.proj.", "patch_embed{s}.proj."),
  ("encoder.patch_embeddings.{i}.layer_norm.", "patch_embed{s}.norm."),
  ("encoder.block.{i}.{j}.", "block{s}.{j}."),
  ("encoder.layer_norm.{i}.", "norm{s}."),
  ("decode_head.linear_c.{i}.proj.", "linear_c{s}.proj."),
  ("decode_head.linear_fuse.", "linear_fuse.conv."),
  ("decode_head.batch_norm.", "linear_fuse.bn."),
  ("decode_head.classifier.", "linear_pred."),
]
_HF_MEMORY_PREFIXES = [
  ("stages.{i}.patch_embeddings.proj.", "patch_embed{s}.proj."),
  ("stages.{i}.patch_embeddings.layer_norm.", "patch_embed{s}.norm."),
  ("stages.{i}.blocks.{j}.", "block{s}.{j}."),
  ("stages.{i}.layer_norm.", "norm{s}."),
  ("decode_head.linear_projections.{i}.proj.", "linear_c{s}.proj."),
]
# Inside a block (names after the block prefix).
_HF_FILE_BLOCK = [
  (".layer_norm_1.", ".norm1."),
  (".layer_norm_2.", ".norm2."),
  (".attention.self.query.", ".attn.q."),
  (".attention.self.key.", ".attn.k."),
  (".attention.self.value.", ".attn.v."),
  (".attention.self.sr.", ".attn.sr."),
  (".attention.self.layer_norm.", ".attn.norm."),
  (".attention.output.dense.", ".attn.proj."),
  (".mlp.dense1.", ".mlp.fc1."),
  (".mlp.dense2.", ".mlp.fc2."),
]
_HF_MEMORY_BLOCK = [
  (".layernorm_before.", ".norm1."),
  (".layernorm_after.", ".norm2."),
  (".attention.q_proj.", ".attn.q."),
  (".attention.k_proj.", ".attn.k."),
  (".attention.v_proj.", ".attn.v."),
  (".attention.o_proj.", ".attn.proj."),
  (".attention.sequence_reduction.sequence_reduction.", ".attn.sr."),
  (".attention.sequence_reduction.layer_norm.", ".attn.norm."),
]
# The HF model's top-level module of everything but the decode head.
_HF_ENCODER_PREFIX = "segformer."

# HuggingFace's PvtV2 (transformers' modeling_pvt_v2.py; save_pretrained and
# state_dict() agree) -> the public PVTv2 wrapper's names. PvtV2ForImageClassification
# puts the encoder under ``pvt_v2.`` beside its ``classifier.``.
_HF_PVT_PREFIX = "pvt_v2."
_HF_PVT_PREFIXES = [
  ("encoder.layers.{i}.patch_embedding.proj.", "backbone.patch_embed{s}.proj."),
  ("encoder.layers.{i}.patch_embedding.layer_norm.", "backbone.patch_embed{s}.norm."),
  ("encoder.layers.{i}.blocks.{j}.", "backbone.block{s}.{j}."),
  ("encoder.layers.{i}.layer_norm.", "backbone.norm{s}."),
]
_HF_PVT_BLOCK = [
  (".layer_norm_1.", ".norm1."),
  (".layer_norm_2.", ".norm2."),
  (".attention.query.", ".attn.q."),
  (".attention.key.", ".attn.k."),
  (".attention.value.", ".attn.v."),
  (".attention.proj.", ".attn.proj."),
  (".attention.spatial_reduction.", ".attn.sr."),
  (".attention.layer_norm.", ".attn.norm."),
  (".mlp.dense1.", ".mlp.fc1."),
  (".mlp.dense2.", ".mlp.fc2."),
]


@functools.lru_cache(maxsize=None)
def _prefix_regex(template: str):
  pattern = re.escape(template)
  for field, group in (("i", r"(?P<i>\d)"), ("s", r"(?P<s>\d)"), ("j", r"(?P<j>\d+)")):
    pattern = pattern.replace(re.escape("{" + field + "}"), group)
  return re.compile(pattern)


def _rename_prefix(name: str, pairs, forward: bool):
  """``name`` with the first matching prefix renamed (HF -> public if ``forward``), or None."""
  for hf, public in pairs:
    source, target = (hf, public) if forward else (public, hf)
    match = _prefix_regex(source).match(name)
    if match:
      fields = match.groupdict()
      stage = int(fields["i"]) if "i" in fields else int(fields.get("s", 1)) - 1
      return target.format(i=stage, s=stage + 1, j=fields.get("j")) + name[match.end() :]
  return None


_BN_COUNTER = (r"(^|\.)num_batches_tracked$", "BatchNorm step counters")
# Tensors that are known and deliberately not imported, per family (public names).
_IGNORED = {
  "segformer": [
    _BN_COUNTER,
    (r"^head\.(weight|bias)$", "the MiT encoder's ImageNet classifier"),
    (r"^classifier\.", "the HuggingFace MiT encoder's ImageNet classifier"),
    (r"^conv_seg\.", "mmseg's unused conv_seg"),
  ],
  "pvtv2": [
    _BN_COUNTER,
    (r"^head\.(weight|bias)$", "the PVTv2 encoder's ImageNet classifier"),
    (r"^classifier\.", "the HuggingFace PVTv2 encoder's ImageNet classifier"),
  ],
  "lvt": [
    _BN_COUNTER,
    (r"^(norm|head)\.(weight|bias)$", "LVT's ImageNet classifier (norm, head)"),
  ],
}
# The public names of each family's decoder (all but the encoder), and of its classifier.
DECODER_PREFIXES = {
  "segformer": ("linear_c", "linear_fuse.", "linear_pred."),
  "pvtv2": ("neck.", "head."),
  "lvt": ("linear_c", "linear_fuse.", "linear_pred."),
}
CLASSIFIER = {"segformer": "linear_pred.", "pvtv2": "head.conv_seg.", "lvt": "linear_pred."}
_LVT_NAME = re.compile(r"^backbone\.\d\.[01]\.")
_PVT_DECODER = ("neck.lateral_convs.", "neck.fpn_convs.", "head.scale_heads.", "head.conv_seg.")


def _is_hf(names) -> bool:
  return any(
    n.startswith(("segformer.", "encoder.patch_embeddings.", "encoder.block.", "stages."))
    for n in names
  )


def _is_hf_pvt(names) -> bool:
  return any(n.startswith((_HF_PVT_PREFIX, "encoder.layers.")) for n in names)


def _is_lvt(names) -> bool:
  return any(_LVT_NAME.match(n) for n in names)


def _strip_module(state):
  return {re.sub(r"^(module\.)+", "", k): v for k, v in state.items()}


def source_format(state) -> Tuple[str, str]:
  """(layout, normalization) of a checkpoint's names.

  layout: "transkd" (the distillation wrapper, ``student.``), "huggingface"
  (SegFormer or PvtV2), "mmseg" (SegFormer's ``backbone.`` / ``decode_head.``)
  or "public" (the public code's plain names: SegFormer's, the PVTv2 wrapper's,
  LVT's, or an official ImageNet encoder's). normalization: the input scaling
  the source code feeds its models, a guess from the layout: "unit" ([0, 1]
  pixels) for TransKD's code (a checkpoint with a segmentation decoder),
  "imagenet" (mean/std) for HuggingFace, mmseg and bare ImageNet encoders.
  """
  names = list(_strip_module(state))
  if any(n.startswith("student.") for n in names):
    return "transkd", "unit"
  if _is_hf(names) or _is_hf_pvt(names):
    return "huggingface", "imagenet"
  if _is_lvt(names) or any(n.startswith(_PVT_DECODER) for n in names):
    has_head = any(n.startswith(("linear_pred.",) + _PVT_DECODER) for n in names)
    return "public", "unit" if has_head else "imagenet"
  if any(n.startswith(("backbone.", "decode_head.")) for n in names):
    return "mmseg", "imagenet"
  has_head = any(n.startswith("linear_pred.") for n in names)
  return "public", "unit" if has_head else "imagenet"


def _unwrap(state):
  """(state without module. / student., [(name, why) dropped], [notes])."""
  notes, ignored = [], []
  state = _strip_module(state)
  if any(k.startswith("student.") for k in state):
    rest = [k for k in state if not k.startswith("student.")]
    if rest:
      notes.append(
        f"TransKD checkpoint: took student.*, left {len(rest)} tensors of the "
        "training-time modules (CSF, PEA, GL-Mixer, EA)"
      )
    ignored += [(k, "TransKD training-time module") for k in rest]
    state = _strip_module(
      {k[len("student.") :]: v for k, v in state.items() if k.startswith("student.")}
    )
  return state, ignored, notes


def _rename(state, family: str):
  """A checkpoint's names (unwrapped) -> the public code's names of ``family``."""
  if family == "segformer":
    if _is_hf(state):
      return _hf_to_public(state)
    # mmseg's SegFormer: backbone.* and decode_head.*
    return {re.sub(r"^(backbone|decode_head)\.", "", k): v for k, v in state.items()}
  if family == "pvtv2":
    if _is_hf_pvt(state):
      return _hf_pvt_to_public(state)
    if not any(k.startswith("backbone.") for k in state):
      # The official ImageNet encoder (pvt_v2_b*.pth): flat MiT names.
      return {
        ("backbone." + k if re.match(r"(patch_embed|block|norm)\d", k) else k): v
        for k, v in state.items()
      }
  return dict(state)


def canonical_names(state: Dict[str, np.ndarray], family: str = "segformer"):
  """Returns ({public name: array}, [(name, why) ignored], [notes]) for ``family``."""
  state, ignored, notes = _unwrap(state)
  state = _rename(state, family)
  kept = {}
  for name, value in state.items():
    why = next((w for pattern, w in _IGNORED[family] if re.search(pattern, name)), None)
    if why:
      ignored.append((name, why))
    else:
      kept[name] = value
  return kept, ignored, notes


def _join_kv(out):
  """One kv layer, k first, as in the public code (HF keeps k and v apart)."""
  for k_name in [n for n in out if ".attn.k." in n]:
    v_name = k_name.replace(".attn.k.", ".attn.v.")
    if v_name in out:
      out[k_name.replace(".attn.k.", ".attn.kv.")] = np.concatenate(
        [out.pop(k_name), out.pop(v_name)], axis=0
      )
  return out


def _hf_to_public(state):
  out = {}
  for name, value in state.items():
    name = name[len(_HF_ENCODER_PREFIX) :] if name.startswith(_HF_ENCODER_PREFIX) else name
    name = _rename_prefix(name, _HF_MEMORY_PREFIXES + _HF_FILE_PREFIXES, forward=True) or name
    if name.startswith("block"):
      for old, new in _HF_FILE_BLOCK + _HF_MEMORY_BLOCK:
        name = name.replace(old, new)
    out[name] = value
  return _join_kv(out)


def _hf_pvt_to_public(state):
  """HuggingFace PvtV2 names -> the public PVTv2 wrapper's (``backbone.block1.0.attn.kv``)."""
  out = {}
  for name, value in state.items():
    name = name[len(_HF_PVT_PREFIX) :] if name.startswith(_HF_PVT_PREFIX) else name
    name = _rename_prefix(name, _HF_PVT_PREFIXES, forward=True) or name
    if name.startswith("backbone.block"):
      for old, new in _HF_PVT_BLOCK:
        name = name.replace(old, new)
    out[name] = value
  return _join_kv(out)


def public_to_hf(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """SegFormer's public names -> the names HF's save_pretrained writes (kv split into key and
  value).

  The inverse of ``_hf_to_public`` on what SegFormer has; raises ValueError on a
  name it cannot place.
  """
  out = {}
  for name, value in state.items():
    if ".attn.kv." in name:
      k, v = np.split(value, 2, axis=0)
      pieces = [
        (name.replace(".attn.kv.", ".attn.k."), k),
        (name.replace(".attn.kv.", ".attn.v."), v),
      ]
    else:
      pieces = [(name, value)]
    for piece, array in pieces:
      if piece.startswith("block"):
        for hf, public in _HF_FILE_BLOCK:
          piece = piece.replace(public, hf)
      renamed = _rename_prefix(piece, _HF_FILE_PREFIXES, forward=False)
      if renamed is None:
        raise ValueError(f"{name}: no HuggingFace SegFormer name for it")
      if not renamed.startswith("decode_head."):
        renamed = _HF_ENCODER_PREFIX + renamed
      out[renamed] = array
  return out


# --------------------------------------------------------------------------
# The Flax tree <-> public names
# --------------------------------------------------------------------------

_LEAVES = {
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
  return ".".join(names + [_LEAVES[parts[-1]]])


def _lvt_encoder_name(parts) -> str:
  leaf = _LEAVES[parts[-1]]
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
    leaf = _LEAVES[parts[-1]]
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


def _depths(names, template: str):
  """Blocks per stage, from public names; ``template`` is a regex with {s} for the stage."""
  depths = []
  for stage in range(4):
    pattern = re.compile(template.format(s=stage + 1, s0=stage))
    blocks = {int(m.group(1)) for n in names for m in [pattern.match(n)] if m}
    depths.append(max(blocks) + 1 if blocks else 0)
  return tuple(depths)


def guess_variant(names: Dict[str, np.ndarray]) -> str:
  """The MiT variant a set of SegFormer public names looks like, or '' if unclear."""
  return _guess_mit_row(names, VARIANTS, "")


def _guess_mit_row(names, table, prefix: str) -> str:
  depths = _depths(names, prefix.replace(".", r"\.") + r"block{s}\.(\d+)\.")
  width = names.get(prefix + "patch_embed1.proj.weight")
  fc1 = names.get(prefix + "block1.0.mlp.fc1.weight")
  found = [
    name
    for name, row in table.items()
    if tuple(row.depths) == depths
    and (width is None or width.shape[0] == row.channels[0])
    and (fc1 is None or width is None or fc1.shape[0] == row.mlp_ratios[0] * row.channels[0])
  ]
  return found[0] if len(found) == 1 else ""


def _guess_family(names):
  """The family a checkpoint's unwrapped names look like, or None."""
  if _is_lvt(names):
    return "lvt"
  if _is_hf_pvt(names) or any(n.startswith(_PVT_DECODER) for n in names):
    return "pvtv2"
  if _is_hf(names) or any(
    n.startswith(("decode_head.", "linear_c", "linear_fuse.", "linear_pred.")) for n in names
  ):
    return "segformer"
  # A bare encoder: PVTv2 B0-B4's first Mix-FFNs are 8 times wider, MiT's 4 times.
  fc1 = names.get("block1.0.mlp.fc1.weight", names.get("backbone.block1.0.mlp.fc1.weight"))
  if fc1 is not None and np.ndim(fc1) == 2:
    return "pvtv2" if fc1.shape[0] == 8 * fc1.shape[1] else "segformer"
  return None


def guess_arch(state) -> str:
  """The --arch a checkpoint looks like (mit_b2, pvt_v2_b0, lvt), or '' if unclear."""
  names, _, _ = _unwrap(state)
  family = _guess_family(names)
  if family is None:
    return ""
  public = _rename(names, family)
  if family == "segformer":
    name = guess_variant(public)
    return f"mit_{name}" if name else ""
  if family == "pvtv2":
    name = _guess_mit_row(public, PVT_VARIANTS, "backbone.")
    return f"pvt_v2_{name}" if name else ""
  depths = _depths(public, r"backbone\.{s0}\.1\.(\d+)\.")
  width = public.get("backbone.0.0.proj.weight")
  for name, row in LVT_VARIANTS.items():
    if tuple(row.depths) == depths and (width is None or width.shape[0] == row.channels[0]):
      return name
  return ""


def model_for(family: str, spec, num_classes: int):
  """The flax module of ``family`` for a variant row (transkd_jax.models.archs' build)."""
  from transkd_jax.models import archs

  return archs.ARCHS[family].model(variant=spec, num_classes=num_classes)


def expected_shapes(spec, num_classes: int, family: str = "segformer"):
  """{flax path: shape} of the model's variables, from abstract evaluation only."""
  import jax
  import jax.numpy as jnp

  model = model_for(family, spec, num_classes)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(shapes).items()}


def _decode(module, features):
  neck = getattr(module, "neck", None)
  return module.head(neck(features) if neck is not None else features)


def fresh_decoder(spec, num_classes: int, seed: int, family: str = "segformer"):
  """A freshly initialised decoder (SegFormer / LVT: head; PVTv2: neck and head), initialised
  as the model initialises them: {"params": {"head", ["neck"]}, ["batch_stats": {"head"}]}."""
  import jax
  import jax.numpy as jnp

  model = model_for(family, spec, num_classes)
  features = [jnp.zeros((1, 16 // 2**i, 16 // 2**i, c)) for i, c in enumerate(spec.channels)]
  variables = jax.jit(functools.partial(model.init, method=_decode))(jax.random.key(seed), features)
  return jax.tree.map(np.asarray, variables)


def fresh_head(spec, num_classes: int, seed: int):
  """SegFormer's freshly initialised head: {"params", "batch_stats"} of the head alone."""
  variables = fresh_decoder(spec, num_classes, seed, "segformer")
  return {collection: tree["head"] for collection, tree in variables.items()}


def _summarise_ignored(ignored, log):
  by_reason = {}
  for name, why in ignored:
    by_reason.setdefault(why, []).append(name)
  for why, names in sorted(by_reason.items()):
    shown = ", ".join(sorted(names)[:4]) + (", ..." if len(names) > 4 else "")
    log(f"dropped {len(names)} tensor{'s' if len(names) != 1 else ''} ({why}): {shown}")


def convert(
  state: Dict[str, np.ndarray],
  arch,
  num_classes=None,
  seed: int = 0,
  log=print,
  family=None,
  source: str = "",
):
  """Maps a state dict onto the model of ``arch``; returns ({"params", "batch_stats"},
  num_classes).

  ``arch``: see ``resolve_arch`` (``family`` only for a MiTVariant row meant as
  PVTv2). ``source``: the file, for messages. Raises UserError listing every
  missing, unexpected and mis-shaped tensor.
  """
  family, spec, _, arch_name = resolve_arch(arch, family)
  what = model_label(family, arch_name)
  names, ignored, notes = canonical_names(state, family)
  for note in notes:
    log(note)
  if ignored:
    _summarise_ignored(ignored, log)

  has_decoder = any(n.startswith(DECODER_PREFIXES[family]) for n in names)
  classifier = CLASSIFIER[family]
  weight, bias = classifier + "weight", classifier + "bias"
  source_classes = names[weight].shape[0] if weight in names else None
  if num_classes is None:
    num_classes = source_classes or 19
  if source_classes is not None and source_classes != num_classes:
    if (source_classes, num_classes) == (IGNORE_LABEL_ROW + 1, IGNORE_LABEL_ROW):
      log(
        f"20-way head -> 19 classes: dropped row 19 of {classifier}* (the public code's "
        "ignore class)"
      )
      names[weight] = names[weight][:IGNORE_LABEL_ROW]
      if bias in names:
        names[bias] = names[bias][:IGNORE_LABEL_ROW]
    else:
      raise UserError(
        f"{source + ': ' if source else ''}the checkpoint's head predicts {source_classes} "
        f"classes but --num-classes is {num_classes}; only 20 -> 19 (dropping the ignore "
        "class) is converted. Leave out --num-classes to keep the checkpoint's classes."
      )

  expected = expected_shapes(spec, num_classes, family)
  flat, missing, mismatched = {}, [], []
  used = set()
  for path, shape in expected.items():
    if path[1] != "encoder" and not has_decoder:
      continue  # freshly initialised below
    name = torch_name(path, family)
    if name not in names:
      missing.append(name)
      continue
    used.add(name)
    value = to_flax_layout(np.asarray(names[name], np.float32), len(shape))
    if value.shape != shape:
      mismatched.append(
        f"{name}: checkpoint {tuple(names[name].shape)} -> {value.shape}, {arch_name} needs {shape}"
      )
      continue
    flat[path] = value
  unexpected = sorted(set(names) - used)
  if missing or unexpected or mismatched:
    lines = [
      f"{source + ': ' if source else ''}the checkpoint does not fit {what} "
      f"(--arch={arch_name}) with {num_classes} classes; nothing was written."
    ]
    guess = guess_arch(state)
    if guess:
      guessed_family, guessed_spec = resolve_arch(guess)[:2]
      if (guessed_family, guessed_spec) != (family, spec):
        lines.append(f"It looks like {guess}: try --arch={guess}.")
    for title, items in (
      ("missing", missing),
      ("unexpected", unexpected),
      ("shape mismatch", mismatched),
    ):
      if items:
        lines.append(f"{title} ({len(items)}):")
        lines += [f"  {item}" for item in items]
    raise UserError("\n".join(lines))
  if not has_decoder:
    parts = "the neck and the head" if family == "pvtv2" else "the head"
    log(
      f"no decoder in the checkpoint (a bare encoder): {parts} ({num_classes} classes) "
      f"freshly initialised with seed {seed}"
    )
    decoder = traverse_util.flatten_dict(fresh_decoder(spec, num_classes, seed, family))
    flat.update({path: decoder[path] for path in expected if path[1] != "encoder"})
  tree = traverse_util.unflatten_dict(flat)
  tree.setdefault("batch_stats", {})
  return tree, num_classes


def record(
  arch, num_classes: int, source: str, layout: str, normalization: str, family=None
) -> dict:
  """The META_FILE record of a conversion: what ``transkd_jax.build.read_model`` and
  ``transkd_jax.export`` need (family and variant as transkd_jax.models.archs names them)."""
  family, _, variant, arch_name = resolve_arch(arch, family)
  return {
    "arch": arch_name,
    "family": family,
    "variant": variant,
    "num_classes": num_classes,
    "source": source,
    "source_format": layout,
    "normalization": normalization,
  }


def save(tree, output: str, meta: dict, overwrite: bool = False):
  import orbax.checkpoint as ocp

  output = os.path.abspath(output)
  if os.path.exists(output) and not overwrite:
    raise UserError(f"--output {output} exists; choose a new directory or pass --overwrite")
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(output, tree, force=overwrite)
  checkpointer.wait_until_finished()
  with open(os.path.join(output, META_FILE), "w") as f:
    json.dump(meta, f, indent=2)


def main(argv=None):
  parser = argparse.ArgumentParser(
    prog="python -m transkd_jax.convert",
    formatter_class=argparse.RawDescriptionHelpFormatter,
    description="Convert SegFormer, PVTv2 or LVT weights (PyTorch state dicts, HuggingFace\n"
    "directories) to an Orbax checkpoint of transkd_jax.models, with a\n"
    f"{META_FILE} record (arch, family, variant, classes, source, layout,\n"
    "input normalisation).",
    epilog="inputs per --arch:\n"
    "  mit_b*     official mit_b*.pth ImageNet encoders; mmseg SegFormer checkpoints;\n"
    "             the public TransKD code's SegFormers; HuggingFace Segformer\n"
    "  pvt_v2_b*  official pvt_v2_b*.pth ImageNet encoders (head.* dropped);\n"
    "             HuggingFace PvtV2Model / PvtV2ForImageClassification; the public\n"
    "             code's PVTv2 teachers / students (backbone.*, neck.*, head.*)\n"
    "  lvt        lvt_imagenet_pretrained.pth.tar (backbone.*); the public code's\n"
    "             LVT students (backbone.* + linear_c*, linear_fuse, linear_pred)\n"
    "Any of them may carry DataParallel's module. and the distillation wrapper's\n"
    "student. prefixes (its CSF / PEA tensors are dropped) and sit under\n"
    "'state_dict' or 'model'. A bare encoder gets a fresh decoder (--seed).",
  )
  parser.add_argument(
    "--input", required=True, help=".pth/.pth.tar/.bin/.safetensors file or HuggingFace directory"
  )
  parser.add_argument(
    "--arch",
    required=True,
    help="mit_b0 .. mit_b5 (SegFormer), pvt_v2_b0 .. pvt_v2_b5 (PVTv2 + FPN), lvt",
  )
  parser.add_argument("--output", required=True, help="Orbax checkpoint directory to write")
  parser.add_argument(
    "--num-classes",
    type=int,
    default=None,
    help="classes of the head (default: the checkpoint's, 19 for bare "
    "encoders); 19 turns a 20-way head into 19 classes",
  )
  parser.add_argument(
    "--seed", type=int, default=0, help="seed of a freshly initialised decoder (bare encoders)"
  )
  parser.add_argument(
    "--input-norm",
    choices=("auto",) + NORMALIZATIONS,
    default="auto",
    help="the input normalisation the weights expect, recorded with them: "
    "imagenet (mean/std on 0-255 pixels: official ImageNet encoders, "
    "HuggingFace, mmseg) or unit ([0, 1] pixels: the public TransKD "
    "code's teachers and students); auto guesses from the "
    "checkpoint's layout",
  )
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
  args = parser.parse_args(argv)
  try:
    resolve_arch(args.arch)  # before reading a large file
    state = read_state_dict(args.input)
    tree, num_classes = convert(state, args.arch, args.num_classes, args.seed, source=args.input)
    layout, normalization = source_format(state)
    if args.input_norm != "auto":
      normalization = args.input_norm
    meta = record(args.arch, num_classes, os.path.abspath(args.input), layout, normalization)
    save(tree, args.output, meta, args.overwrite)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(
    f"wrote {os.path.abspath(args.output)} ({meta['arch']}, {num_classes} classes, "
    f"expects {meta['normalization']} input normalisation)"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
