"""Import the SegFormer weights people already have into an Orbax checkpoint.

    python -m transkd_jax.convert --input=PATH --arch=mit_b2 --output=DIR [--num-classes=19]

Reads
  * PyTorch state dicts (``.pth``, ``.pth.tar``, ``.pt``, ``.bin``; needs torch):
    the official SegFormer ImageNet encoders (mit_b0.pth ...), SegFormer/mmseg
    checkpoints (``backbone.`` / ``decode_head.``), and TransKD checkpoints
    (optionally under ``state_dict`` / ``model``, with ``module.`` and the
    distillation wrapper's ``student.`` prefixes);
  * HuggingFace SegFormer checkpoints written by ``save_pretrained`` (a
    directory, ``model.safetensors`` or ``pytorch_model.bin``). Safetensors
    needs no torch.

Writes ``DIR`` with ``orbax.checkpoint.StandardCheckpointer``: the plain pytree
``{"params": ..., "batch_stats": ...}`` of ``transkd_jax.models.SegFormer``,
plus ``DIR/transkd_convert.json`` saying what it holds (arch, classes, source,
its layout and the input normalisation that layout's code uses). Names are
first brought to the public PyTorch code's names (``block1.0.attn.kv.weight``
...), then mapped onto the Flax tree, whose names follow the same code.
``transkd_jax.export`` goes the other way with the same name tables.
"""

import argparse
import functools
import json
import os
import re
import sys
from typing import Dict, Tuple

import numpy as np
from flax import traverse_util

from transkd_jax.errors import UserError
from transkd_jax.normalization import CONVERT_RECORD, NORMALIZATIONS
from transkd_jax.models.variants import get_variant

IGNORE_LABEL_ROW = 19  # the public code's 20th class: the ignore label, loss weight 0
META_FILE = CONVERT_RECORD
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".tar", ".ckpt")


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
        "safetensors files need no torch") from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise UserError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''})") from None
  for key in ("state_dict", "model", "module"):
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      obj = obj[key]
      break
  if not isinstance(obj, dict) or not any(torch.is_tensor(v) for v in obj.values()):
    raise UserError(f"{path}: expected a state dict (names -> tensors), possibly under "
                    f"'state_dict' or 'model'; found {type(obj).__name__}")
  return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
          for k, v in obj.items() if torch.is_tensor(v)}


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
    for name, reader in (("model.safetensors", _read_safetensors),
                         ("model.safetensors.index.json",
                          lambda p: _read_index(p, _read_safetensors)),
                         ("pytorch_model.bin", _read_torch),
                         ("pytorch_model.bin.index.json", lambda p: _read_index(p, _read_torch))):
      if os.path.exists(os.path.join(path, name)):
        return reader(os.path.join(path, name))
    raise UserError(f"--input {path}: a directory, but it holds none of model.safetensors, "
                    "pytorch_model.bin (or their .index.json): expected a HuggingFace "
                    "save_pretrained directory")
  if path.endswith(".safetensors"):
    return _read_safetensors(path)
  if path.endswith(".index.json"):
    reader = _read_safetensors if "safetensors" in path else _read_torch
    return _read_index(path, reader)
  if path.endswith(TORCH_SUFFIXES):
    return _read_torch(path)
  raise UserError(f"--input {path}: unknown checkpoint type; expected a .safetensors file, a "
                  f"PyTorch file ({', '.join(TORCH_SUFFIXES)}) or a HuggingFace directory")


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
    (".layer_norm_1.", ".norm1."), (".layer_norm_2.", ".norm2."),
    (".attention.self.query.", ".attn.q."), (".attention.self.key.", ".attn.k."),
    (".attention.self.value.", ".attn.v."), (".attention.self.sr.", ".attn.sr."),
    (".attention.self.layer_norm.", ".attn.norm."), (".attention.output.dense.", ".attn.proj."),
    (".mlp.dense1.", ".mlp.fc1."), (".mlp.dense2.", ".mlp.fc2."),
]
_HF_MEMORY_BLOCK = [
    (".layernorm_before.", ".norm1."), (".layernorm_after.", ".norm2."),
    (".attention.q_proj.", ".attn.q."), (".attention.k_proj.", ".attn.k."),
    (".attention.v_proj.", ".attn.v."), (".attention.o_proj.", ".attn.proj."),
    (".attention.sequence_reduction.sequence_reduction.", ".attn.sr."),
    (".attention.sequence_reduction.layer_norm.", ".attn.norm."),
]
# The HF model's top-level module of everything but the decode head.
_HF_ENCODER_PREFIX = "segformer."


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
      return target.format(i=stage, s=stage + 1, j=fields.get("j")) + name[match.end():]
  return None


# Tensors that are known and deliberately not imported.
_IGNORED = [
    (r"(^|\.)num_batches_tracked$", "BatchNorm step counters"),
    (r"^head\.", "ImageNet classifier of the MiT encoder"),
    (r"^classifier\.", "ImageNet classifier of the HuggingFace MiT encoder"),
    (r"^conv_seg\.", "mmseg's unused conv_seg"),
]


def _is_hf(names) -> bool:
  return any(n.startswith(("segformer.", "encoder.patch_embeddings.", "encoder.block.",
                            "stages.")) for n in names)


def source_format(state) -> Tuple[str, str]:
  """(layout, normalization) of a checkpoint's names.

  layout: "transkd" (the distillation wrapper, ``student.``), "huggingface",
  "mmseg" (``backbone.`` / ``decode_head.``) or "public" (the public code's
  plain names). normalization: the input scaling the source code feeds its
  models, a guess from the layout: "unit" ([0, 1] pixels) for TransKD's code,
  "imagenet" (mean/std) for HuggingFace, mmseg and bare ImageNet encoders.
  """
  names = [re.sub(r"^(module\.)+", "", k) for k in state]
  if any(n.startswith("student.") for n in names):
    return "transkd", "unit"
  if _is_hf(names):
    return "huggingface", "imagenet"
  if any(n.startswith(("backbone.", "decode_head.")) for n in names):
    return "mmseg", "imagenet"
  has_head = any(n.startswith("linear_pred.") for n in names)
  return "public", "unit" if has_head else "imagenet"


def canonical_names(state: Dict[str, np.ndarray]):
  """Returns ({public name: array}, [(name, why) ignored], [notes])."""
  notes = []
  state = {re.sub(r"^(module\.)+", "", k): v for k, v in state.items()}
  ignored = []
  if any(k.startswith("student.") for k in state):
    rest = [k for k in state if not k.startswith("student.")]
    if rest:
      notes.append(f"TransKD checkpoint: took student.*, left {len(rest)} tensors of the "
                   "training-time modules (CSF, PEA, GL-Mixer, EA)")
    ignored += [(k, "TransKD training-time module") for k in rest]
    state = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
  if _is_hf(state):
    state = _hf_to_public(state)
  else:  # mmseg's SegFormer: backbone.* and decode_head.*
    state = {re.sub(r"^(backbone|decode_head)\.", "", k): v for k, v in state.items()}
  kept = {}
  for name, value in state.items():
    why = next((w for pattern, w in _IGNORED if re.search(pattern, name)), None)
    if why:
      ignored.append((name, why))
    else:
      kept[name] = value
  return kept, ignored, notes


def _hf_to_public(state):
  out = {}
  for name, value in state.items():
    name = name[len(_HF_ENCODER_PREFIX):] if name.startswith(_HF_ENCODER_PREFIX) else name
    name = _rename_prefix(name, _HF_MEMORY_PREFIXES + _HF_FILE_PREFIXES, forward=True) or name
    if name.startswith("block"):
      for old, new in _HF_FILE_BLOCK + _HF_MEMORY_BLOCK:
        name = name.replace(old, new)
    out[name] = value
  # One kv layer, k first, as in the public code.
  for k_name in [n for n in out if ".attn.k." in n]:
    v_name = k_name.replace(".attn.k.", ".attn.v.")
    if v_name in out:
      out[k_name.replace(".attn.k.", ".attn.kv.")] = np.concatenate(
          [out.pop(k_name), out.pop(v_name)], axis=0)
  return out


def public_to_hf(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Public names -> the names HF's save_pretrained writes (kv split into key and value).

  The inverse of ``_hf_to_public`` on what SegFormer has; raises ValueError on a
  name it cannot place.
  """
  out = {}
  for name, value in state.items():
    if ".attn.kv." in name:
      k, v = np.split(value, 2, axis=0)
      pieces = [(name.replace(".attn.kv.", ".attn.k."), k),
                (name.replace(".attn.kv.", ".attn.v."), v)]
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

def torch_name(path: Tuple[str, ...]) -> str:
  """Public PyTorch name of a Flax leaf, e.g.

  ('params', 'encoder', 'block1_0', 'attn', 'kv', 'kernel') -> 'block1.0.attn.kv.weight'
  ('batch_stats', 'head', 'bn', 'mean') -> 'linear_fuse.bn.running_mean'
  """
  collection, _, *parts = path  # drop 'encoder' / 'head': the public code is flat
  leaf = {"kernel": "weight", "scale": "weight", "bias": "bias",
          "mean": "running_mean", "var": "running_var"}[parts[-1]]
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
  return ".".join(names + [leaf])


def to_flax_layout(array: np.ndarray, ndim: int) -> np.ndarray:
  """PyTorch (out, in[, kh, kw]) -> Flax (in, out) / (kh, kw, in, out)."""
  if ndim == 2:
    return array.T
  if ndim == 4:
    return array.transpose(2, 3, 1, 0)
  return array


def to_torch_layout(array: np.ndarray) -> np.ndarray:
  """Flax (in, out) / (kh, kw, in, out) -> PyTorch (out, in[, kh, kw]): to_flax_layout's inverse."""
  if array.ndim == 2:
    return array.T
  if array.ndim == 4:
    return array.transpose(3, 2, 0, 1)
  return array


def to_public_state_dict(variables) -> Dict[str, np.ndarray]:
  """{"params", "batch_stats"} of a SegFormer -> {public name: float32 array, PyTorch layout}.

  Each BatchNorm also gets the ``num_batches_tracked`` counter PyTorch keeps
  (0: the Flax model does not count), which ``convert`` ignores again.
  """
  out = {}
  for path, value in traverse_util.flatten_dict(variables).items():
    name = torch_name(path)
    out[name] = np.array(to_torch_layout(np.asarray(value, np.float32)), order="C")
    if name.endswith(".running_mean"):
      out[name[:-len("running_mean")] + "num_batches_tracked"] = np.zeros((), np.int64)
  return out


def guess_variant(names: Dict[str, np.ndarray]) -> str:
  """The MiT variant a set of public names looks like, or '' if unclear."""
  depths = []
  for stage in range(1, 5):
    blocks = {int(m.group(1)) for n in names for m in [re.match(rf"block{stage}\.(\d+)\.", n)] if m}
    depths.append(max(blocks) + 1 if blocks else 0)
  for name in ("b0", "b1", "b2", "b3", "b4", "b5"):
    if tuple(depths) == get_variant(name).depths:
      if name in ("b0", "b1"):  # same depths: tell them apart by width
        width = names.get("patch_embed1.proj.weight")
        if width is not None:
          return "b0" if width.shape[0] == 32 else "b1"
      return name
  return ""


def expected_shapes(spec, num_classes: int):
  """{flax path: shape} of SegFormer's variables, from abstract evaluation only."""
  import jax
  import jax.numpy as jnp
  from transkd_jax.models import SegFormer
  model = SegFormer(spec, num_classes)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(shapes).items()}


def fresh_head(spec, num_classes: int, seed: int):
  """A freshly initialised head (params and batch_stats), like the public code's."""
  import jax
  import jax.numpy as jnp
  from transkd_jax.models import SegFormerHead
  features = [jnp.zeros((1, 16 // 2 ** i, 16 // 2 ** i, c)) for i, c in enumerate(spec.channels)]
  head = SegFormerHead(num_classes, spec.decoder_width, spec.head_dropout)
  variables = jax.jit(head.init)(jax.random.key(seed), features)
  return jax.tree.map(np.asarray, variables)


def convert(state: Dict[str, np.ndarray], arch: str, num_classes=None, seed: int = 0,
            log=print):
  """Maps a state dict onto SegFormer(arch); returns ({"params", "batch_stats"}, num_classes).

  Raises UserError listing every missing, unexpected and mis-shaped tensor.
  """
  try:
    spec = get_variant(arch)
  except ValueError as e:
    raise UserError(f"--arch: {e}") from None
  names, ignored, notes = canonical_names(state)
  for note in notes:
    log(note)
  if ignored:
    kinds = sorted({why for _, why in ignored})
    log(f"ignored {len(ignored)} tensors ({'; '.join(kinds)})")

  has_head = any(n.startswith(("linear_c", "linear_fuse", "linear_pred")) for n in names)
  source_classes = names["linear_pred.weight"].shape[0] if "linear_pred.weight" in names else None
  if num_classes is None:
    num_classes = source_classes or 19
  if source_classes is not None and source_classes != num_classes:
    if (source_classes, num_classes) == (IGNORE_LABEL_ROW + 1, IGNORE_LABEL_ROW):
      log("20-way head -> 19 classes: dropped row 19 (the public code's ignore class)")
      names["linear_pred.weight"] = names["linear_pred.weight"][:IGNORE_LABEL_ROW]
      if "linear_pred.bias" in names:
        names["linear_pred.bias"] = names["linear_pred.bias"][:IGNORE_LABEL_ROW]
    else:
      raise UserError(
          f"the checkpoint's head predicts {source_classes} classes but --num-classes is "
          f"{num_classes}; only 20 -> 19 (dropping the ignore class) is converted. Leave out "
          "--num-classes to keep the checkpoint's classes.")

  expected = expected_shapes(spec, num_classes)
  head_init = None
  if not has_head:
    log(f"no decode head in the checkpoint (a bare encoder): the head ({num_classes} classes) "
        f"is freshly initialised with seed {seed}")
    head_init = fresh_head(spec, num_classes, seed)

  flat, missing, mismatched = {}, [], []
  head_flat = traverse_util.flatten_dict(head_init) if head_init is not None else {}
  used = set()
  for path, shape in expected.items():
    if path[1] == "head" and head_init is not None:
      flat[path] = head_flat[(path[0],) + path[2:]]
      continue
    name = torch_name(path)
    if name not in names:
      missing.append(name)
      continue
    used.add(name)
    value = to_flax_layout(np.asarray(names[name], np.float32), len(shape))
    if value.shape != shape:
      mismatched.append(f"{name}: checkpoint {tuple(names[name].shape)} -> "
                        f"{value.shape}, {arch} needs {shape}")
      continue
    flat[path] = value
  unexpected = sorted(set(names) - used)
  if missing or unexpected or mismatched:
    lines = [f"the checkpoint does not fit SegFormer {arch} with {num_classes} classes; "
             "nothing was written."]
    guess = guess_variant(names)
    if guess and get_variant(guess) != spec:
      lines.append(f"It looks like mit_{guess}: try --arch=mit_{guess}.")
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("shape mismatch", mismatched)):
      if items:
        lines.append(f"{title} ({len(items)}):")
        lines += [f"  {item}" for item in items]
    raise UserError("\n".join(lines))
  tree = traverse_util.unflatten_dict(flat)
  tree.setdefault("batch_stats", {})
  return tree, num_classes


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
      description="Convert SegFormer / TransKD PyTorch or HuggingFace weights to an Orbax "
                  "checkpoint of transkd_jax.models.SegFormer.")
  parser.add_argument("--input", required=True,
                      help=".pth/.bin/.safetensors file or HuggingFace directory")
  parser.add_argument("--arch", required=True, help="mit_b0 .. mit_b5")
  parser.add_argument("--output", required=True, help="Orbax checkpoint directory to write")
  parser.add_argument("--num-classes", type=int, default=None,
                      help="classes of the head (default: the checkpoint's, 19 for bare "
                           "encoders); 19 turns a 20-way head into 19 classes")
  parser.add_argument("--seed", type=int, default=0, help="seed of a freshly initialised head")
  parser.add_argument("--input-norm", choices=("auto",) + NORMALIZATIONS, default="auto",
                      help="the input normalisation the weights expect, recorded with them: "
                           "imagenet (mean/std on 0-255 pixels: official SegFormer, "
                           "HuggingFace, mmseg) or unit ([0, 1] pixels: TransKD's own "
                           "teachers); auto guesses from the checkpoint's layout")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
  args = parser.parse_args(argv)
  try:
    state = read_state_dict(args.input)
    tree, num_classes = convert(state, args.arch, args.num_classes, args.seed)
    layout, normalization = source_format(state)
    if args.input_norm != "auto":
      normalization = args.input_norm
    meta = {"arch": f"mit_{args.arch.lower().removeprefix('mit_')}",
            "num_classes": num_classes, "source": os.path.abspath(args.input),
            "source_format": layout, "normalization": normalization}
    save(tree, args.output, meta, args.overwrite)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {os.path.abspath(args.output)} ({meta['arch']}, {num_classes} classes, "
        f"expects {meta['normalization']} input normalisation)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
