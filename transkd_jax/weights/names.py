"""Checkpoint names <-> the public PyTorch code's names.

Every source layout (HuggingFace SegFormer / PvtV2, mmseg, the distillation
wrapper's ``student.``, DataParallel's ``module.``, the official ImageNet
encoders) is first brought to the public TransKD code's names
(``block1.0.attn.kv.weight``, ``backbone.block1.0...``, ``backbone.0.1.0...``);
``layouts`` maps those onto the Flax tree. ``public_to_hf`` goes back to the
names HuggingFace's ``save_pretrained`` writes for a SegFormer.
"""

import functools
import re
from typing import Dict, Tuple

import numpy as np

from transkd_jax.models import archs

# HuggingFace transformers' names <-> the public code's names, as (HF, public)
# pairs; in a prefix, {i} is a stage 0-3 (the public code counts {s} = 1-4) and
# {j} a block. Two HF SegFormer schemes: the names save_pretrained writes (FILE:
# read and written), and the names transformers 5 uses in memory, which a
# torch.save(model.state_dict()) holds (MEMORY: read only). The public code's
# kv layer is k and v apart in HF: see join_kv / public_to_hf.


def _stage_prefixes(patch: str, blocks: str, norm: str, public: str = ""):
  """A stage's patch embedding, blocks and closing norm: HF prefixes -> public ones."""
  return [
    (patch + "proj.", public + "patch_embed{s}.proj."),
    (patch + "layer_norm.", public + "patch_embed{s}.norm."),
    (blocks + "{j}.", public + "block{s}.{j}."),
    (norm, public + "norm{s}."),
  ]


def _attention(prefix: str, **layers):
  """Attention layers inside a block: HF ``.{prefix}{hf}.`` -> public ``.attn.{public}.``."""
  return [(f".{prefix}{hf}.", f".attn.{public}.") for hf, public in layers.items()]


_NORMS = [(".layer_norm_1.", ".norm1."), (".layer_norm_2.", ".norm2.")]
_MLP = [(".mlp.dense1.", ".mlp.fc1."), (".mlp.dense2.", ".mlp.fc2.")]

HF_FILE_PREFIXES = _stage_prefixes(
  "encoder.patch_embeddings.{i}.", "encoder.block.{i}.", "encoder.layer_norm.{i}."
) + [
  ("decode_head.linear_c.{i}.proj.", "linear_c{s}.proj."),
  ("decode_head.linear_fuse.", "linear_fuse.conv."),
  ("decode_head.batch_norm.", "linear_fuse.bn."),
  ("decode_head.classifier.", "linear_pred."),
]
HF_MEMORY_PREFIXES = _stage_prefixes(
  "stages.{i}.patch_embeddings.", "stages.{i}.blocks.", "stages.{i}.layer_norm."
) + [("decode_head.linear_projections.{i}.proj.", "linear_c{s}.proj.")]
# Inside a block (names after the block prefix).
HF_FILE_BLOCK = (
  _NORMS
  + _attention("attention.self.", query="q", key="k", value="v", sr="sr", layer_norm="norm")
  + [(".attention.output.dense.", ".attn.proj.")]
  + _MLP
)
HF_MEMORY_BLOCK = [
  (".layernorm_before.", ".norm1."),
  (".layernorm_after.", ".norm2."),
  *_attention("attention.", q_proj="q", k_proj="k", v_proj="v", o_proj="proj"),
  *_attention("attention.sequence_reduction.", sequence_reduction="sr", layer_norm="norm"),
]
# The HF model's top-level module of everything but the decode head.
HF_ENCODER_PREFIX = "segformer."

# HuggingFace's PvtV2 (transformers' modeling_pvt_v2.py; save_pretrained and
# state_dict() agree) -> the public PVTv2 wrapper's names. PvtV2ForImageClassification
# puts the encoder under ``pvt_v2.`` beside its ``classifier.``.
HF_PVT_PREFIX = "pvt_v2."
HF_PVT_PREFIXES = _stage_prefixes(
  "encoder.layers.{i}.patch_embedding.",
  "encoder.layers.{i}.blocks.",
  "encoder.layers.{i}.layer_norm.",
  public="backbone.",
)
HF_PVT_BLOCK = (
  _NORMS
  + _attention(
    "attention.",
    query="q",
    key="k",
    value="v",
    proj="proj",
    spatial_reduction="sr",
    layer_norm="norm",
  )
  + _MLP
)


@functools.lru_cache(maxsize=None)
def _prefix_regex(template: str):
  pattern = re.escape(template)
  for field, group in (("i", r"(?P<i>\d)"), ("s", r"(?P<s>\d)"), ("j", r"(?P<j>\d+)")):
    pattern = pattern.replace(re.escape("{" + field + "}"), group)
  return re.compile(pattern)


def rename_prefix(name: str, pairs, forward: bool):
  """``name`` with the first matching prefix renamed (HF -> public if ``forward``), or None."""
  for hf, public in pairs:
    source, target = (hf, public) if forward else (public, hf)
    match = _prefix_regex(source).match(name)
    if match:
      fields = match.groupdict()
      stage = int(fields["i"]) if "i" in fields else int(fields.get("s", 1)) - 1
      return target.format(i=stage, s=stage + 1, j=fields.get("j")) + name[match.end() :]
  return None


# --------------------------------------------------------------------------
# What is kept and what is dropped
# --------------------------------------------------------------------------

_BN_COUNTER = (r"(^|\.)num_batches_tracked$", "BatchNorm step counters")
LVT_NAME = re.compile(r"^backbone\.\d\.[01]\.")
PVT_DECODER = ("neck.lateral_convs.", "neck.fpn_convs.", "head.scale_heads.", "head.conv_seg.")


def is_hf(names) -> bool:
  """Whether names are HuggingFace SegFormer's (file or in-memory scheme)."""
  return any(
    n.startswith((HF_ENCODER_PREFIX, "encoder.patch_embeddings.", "encoder.block.", "stages."))
    for n in names
  )


def is_hf_pvt(names) -> bool:
  return any(n.startswith((HF_PVT_PREFIX, "encoder.layers.")) for n in names)


def is_lvt(names) -> bool:
  return any(LVT_NAME.match(n) for n in names)


def strip_module(state):
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
  names = list(strip_module(state))
  if any(n.startswith("student.") for n in names):
    return "transkd", "unit"
  if is_hf(names) or is_hf_pvt(names):
    return "huggingface", "imagenet"
  if is_lvt(names) or any(n.startswith(PVT_DECODER) for n in names):
    has_head = any(n.startswith(("linear_pred.",) + PVT_DECODER) for n in names)
    return "public", "unit" if has_head else "imagenet"
  if any(n.startswith(("backbone.", "decode_head.")) for n in names):
    return "mmseg", "imagenet"
  has_head = any(n.startswith("linear_pred.") for n in names)
  return "public", "unit" if has_head else "imagenet"


def unwrap(state):
  """(state without module. / student., [(name, why) dropped], [notes])."""
  notes, ignored = [], []
  state = strip_module(state)
  if any(k.startswith("student.") for k in state):
    rest = [k for k in state if not k.startswith("student.")]
    if rest:
      notes.append(
        f"TransKD checkpoint: took student.*, left {len(rest)} tensors of the "
        "training-time modules (CSF, PEA, GL-Mixer, EA)"
      )
    ignored += [(k, "TransKD training-time module") for k in rest]
    state = strip_module(
      {k[len("student.") :]: v for k, v in state.items() if k.startswith("student.")}
    )
  return state, ignored, notes


def to_public_names(state, family: str):
  """A checkpoint's names (unwrapped) -> the public code's names of ``family``."""
  if family == "segformer":
    if is_hf(state):
      return hf_to_public(state)
    # mmseg's SegFormer: backbone.* and decode_head.*
    return {re.sub(r"^(backbone|decode_head)\.", "", k): v for k, v in state.items()}
  if family == "pvtv2":
    if is_hf_pvt(state):
      return hf_pvt_to_public(state)
    if not any(k.startswith("backbone.") for k in state):
      # The official ImageNet encoder (pvt_v2_b*.pth): flat MiT names.
      return {
        ("backbone." + k if re.match(r"(patch_embed|block|norm)\d", k) else k): v
        for k, v in state.items()
      }
  return dict(state)


def canonical_names(state: Dict[str, np.ndarray], family: str = "segformer"):
  """Returns ({public name: array}, [(name, why) ignored], [notes]) for ``family``."""
  state, ignored, notes = unwrap(state)
  state = to_public_names(state, family)
  kept = {}
  for name, value in state.items():
    ignored_names = (_BN_COUNTER, *archs.ARCHS[family].public.ignored)
    why = next((w for pattern, w in ignored_names if re.search(pattern, name)), None)
    if why:
      ignored.append((name, why))
    else:
      kept[name] = value
  return kept, ignored, notes


# --------------------------------------------------------------------------
# HuggingFace <-> public
# --------------------------------------------------------------------------


def join_kv(out):
  """One kv layer, k first, as in the public code (HF keeps k and v apart)."""
  for k_name in [n for n in out if ".attn.k." in n]:
    v_name = k_name.replace(".attn.k.", ".attn.v.")
    if v_name in out:
      out[k_name.replace(".attn.k.", ".attn.kv.")] = np.concatenate(
        [out.pop(k_name), out.pop(v_name)], axis=0
      )
  return out


def _hf_renamed(state, top: str, prefixes, block: str, block_names):
  """HF names -> public ones: ``top`` stripped, stage prefixes renamed, then the names inside
  blocks (public names starting with ``block``), k and v joined."""
  out = {}
  for name, value in state.items():
    name = name.removeprefix(top)
    name = rename_prefix(name, prefixes, forward=True) or name
    if name.startswith(block):
      for old, new in block_names:
        name = name.replace(old, new)
    out[name] = value
  return join_kv(out)


def hf_to_public(state):
  """HuggingFace SegFormer names (either scheme) -> the public SegFormer's."""
  return _hf_renamed(
    state,
    HF_ENCODER_PREFIX,
    HF_MEMORY_PREFIXES + HF_FILE_PREFIXES,
    "block",
    HF_FILE_BLOCK + HF_MEMORY_BLOCK,
  )


def hf_pvt_to_public(state):
  """HuggingFace PvtV2 names -> the public PVTv2 wrapper's (``backbone.block1.0.attn.kv``)."""
  return _hf_renamed(state, HF_PVT_PREFIX, HF_PVT_PREFIXES, "backbone.block", HF_PVT_BLOCK)


def public_to_hf(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """SegFormer's public names -> the names HF's save_pretrained writes (kv split into key and
  value).

  The inverse of ``hf_to_public`` on what SegFormer has; raises ValueError on a
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
        for hf, public in HF_FILE_BLOCK:
          piece = piece.replace(public, hf)
      renamed = rename_prefix(piece, HF_FILE_PREFIXES, forward=False)
      if renamed is None:
        raise ValueError(f"{name}: no HuggingFace SegFormer name for it")
      if not renamed.startswith("decode_head."):
        renamed = HF_ENCODER_PREFIX + renamed
      out[renamed] = array
  return out
