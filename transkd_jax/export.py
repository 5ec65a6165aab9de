"""Export a trained model for PyTorch users: HuggingFace transformers or the public layout.

    python -m transkd_jax.export --checkpoint=WORKDIR_OR_DIR --format=hf --output=D \\
        [--normalization=auto|unit|imagenet] [--heads=1,2,5,8] [--overwrite]
    python -m transkd_jax.export --checkpoint=WORKDIR_OR_DIR --format=pytorch --output=D

``--checkpoint`` is a training run's workdir (its best checkpoint, else its
latest: the run's trained model) or a directory ``transkd_jax.convert`` wrote.
The model family (SegFormer, PVTv2, LVT) is what a convert output's
``transkd_convert.json`` records, else read off the parameter tree (PVTv2 has
``params/neck``, LVT a convolutional self-attention ``encoder/block1_0/attn/attn``,
SegFormer neither). The variant is the record's, else read off the shapes and
matched against the family's table (``transkd_jax/models/variants.py``,
``PVT_VARIANTS``, ``LVT_VARIANTS``). Attention heads leave no trace in the
shapes: a SegFormer variant that is no row of the table needs ``--heads``.

``--format=hf`` (SegFormer only) writes ``D/model.safetensors``, ``config.json``
and ``preprocessor_config.json``, for
``transformers.SegformerForSemanticSegmentation.from_pretrained(D)`` and
``SegformerImageProcessor.from_pretrained(D)``. ``--format=pytorch`` (or its
alias ``public``) writes ``D/model.pth``, a state dict with the public TransKD
code's names, which its models load with ``load_state_dict(strict=True)`` and
``transkd_jax.convert`` reads back to the same variables: SegFormer's
(``block1.0.attn.kv.weight`` ..., also NVlabs'), the PVTv2 wrapper's
(``build_pvts(name, classes)``: ``backbone.*``, ``neck.*``, ``head.*``) and
LVT's (``lvt(rasa_cfg)``: ``backbone.{stage}.*``, ``linear_c*``, ``linear_fuse``,
``linear_pred``).

``--normalization`` is the input scaling the preprocessor config declares:
``unit`` (pixels / 255, no mean/std: TransKD's reference transforms),
``imagenet`` (ImageNet mean/std: official SegFormer weights, the ``mmseg``
transforms). ``auto``: a run's saved config decides (``data.transforms``, or
the older ``data.protocol``, ``mmseg`` -> imagenet, else unit); for a converted
directory, what ``transkd_convert.json`` records, else unit. The processor
resizes to the run's ``image_size`` under the reference transforms, and does
not resize otherwise (mmseg's evaluation keeps the aspect ratio, which the
processor cannot; Cityscapes' 1024 x 2048 needs no resize).
"""

import argparse
import json
import os
import re
import sys
from typing import Optional, Tuple

import jax
import numpy as np
from flax import traverse_util

from transkd_jax import convert, storage
from transkd_jax import normalization as normalization_lib
from transkd_jax.checkpoint import check_variables
from transkd_jax.errors import UserError
from transkd_jax.models.lvt import LVT_VARIANTS
from transkd_jax.models.mit import EPS_BLOCK
from transkd_jax.models.pvtv2 import PVT_VARIANTS
from transkd_jax.models.variants import PATCH_GEOMETRY, VARIANTS, MiTVariant

FORMATS = ("hf", "pytorch", "public")  # public: the same as pytorch
NORMALIZATIONS = ("auto", "unit", "imagenet")
# SegformerImageProcessor's mean/std on [0, 1] pixels; ImageNet's is the mmseg transforms'
# MEAN / STD (0-255 scale) over 255.
IMAGE_STATS = {
  "unit": ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0]),
  "imagenet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
}
PIL_BILINEAR = 2  # the reference transforms resize with PIL's bilinear filter
IGNORE_INDEX = 255


# --------------------------------------------------------------------------
# The variant, from shapes
# --------------------------------------------------------------------------


def _fields(spec: MiTVariant) -> dict:
  return {
    "channels": spec.channels,
    "depths": spec.depths,
    "decoder width": spec.decoder_width,
    "mlp ratios": tuple(spec.mlp_ratios),
    "sr ratios": spec.sr_ratios,
  }


def _param_shapes(variables, label: str, model: str):
  """({params path: shape}, shape(*path) raising UserError naming the missing parameter)."""
  flat = {
    path: tuple(np.shape(leaf))
    for path, leaf in traverse_util.flatten_dict(variables.get("params", {})).items()
  }

  def shape(*path):
    if path not in flat:
      raise UserError(
        f"--checkpoint holds no {label} parameter params/{'/'.join(path)} "
        f"(expected the variables of transkd_jax.models.{model})"
      )
    return flat[path]

  return flat, shape


def _mit_encoder(flat, shape):
  """(channels, depths, sr ratios, mlp ratios) of a MiT / PVTv2 encoder, from shapes."""
  channels = tuple(shape("encoder", f"patch_embed{s}", "proj", "kernel")[-1] for s in range(1, 5))
  depths, sr_ratios, mlp_ratios = [], [], []
  for s in range(1, 5):
    blocks = {
      int(m.group(1))
      for path in flat
      if path[0] == "encoder" and len(path) > 1
      for m in [re.fullmatch(rf"block{s}_(\d+)", path[1])]
      if m
    }
    depths.append(len(blocks))
    if blocks != set(range(len(blocks))):
      raise UserError(f"--checkpoint: stage {s}'s blocks are not numbered 0..n-1: {sorted(blocks)}")
    sr = flat.get(("encoder", f"block{s}_0", "attn", "sr", "kernel"))
    sr_ratios.append(sr[0] if sr else 1)
    ratios = set()
    for j in blocks:
      fc1 = shape("encoder", f"block{s}_{j}", "mlp", "fc1", "kernel")
      ratios.add(fc1[1] / fc1[0])
    if len(ratios) > 1 or not float(next(iter(ratios), 4)).is_integer():
      raise UserError(
        f"--checkpoint: stage {s}'s Mix-FFN widths are not one integer multiple "
        f"of its channels (ratios {sorted(ratios)})"
      )
    mlp_ratios.append(int(next(iter(ratios), 4)))
  return channels, tuple(depths), tuple(sr_ratios), tuple(mlp_ratios)


def infer_variant(variables, heads: Optional[Tuple[int, ...]] = None):
  """(table name or "", MiTVariant, num_classes) of SegFormer variables, from shapes only.

  A row of the variant table gives the heads; a variant that is no row needs
  ``heads``. Raises UserError naming what is missing or does not match.
  """
  flat, shape = _param_shapes(variables, "SegFormer", "SegFormer")
  channels, depths, sr_ratios, mlp_ratios = _mit_encoder(flat, shape)
  decoder_width = shape("head", "linear_fuse", "kernel")[-1]
  num_classes = shape("head", "linear_pred", "kernel")[-1]
  found = MiTVariant(channels, depths, (0, 0, 0, 0), decoder_width, mlp_ratios, sr_ratios)

  name, row = next(
    ((n, r) for n, r in VARIANTS.items() if _fields(r) == _fields(found)), ("", None)
  )
  if heads is None:
    if row is None:
      raise UserError(_no_row_message(found))
    heads = row.heads
  heads = tuple(int(h) for h in heads)
  if len(heads) != 4 or any(h < 1 or c % h for h, c in zip(heads, channels)):
    raise UserError(
      f"--heads={','.join(map(str, heads))}: expected 4 positive head counts, "
      f"each dividing its stage's channels {channels}"
    )
  if row is not None and row.heads != heads:
    name, row = "", None  # the table's shapes with other heads: a custom variant
  spec = row if row is not None else found._replace(heads=heads)
  _check_shapes(variables, spec, num_classes, f"mit_{name}" if name else "the inferred variant")
  return (f"mit_{name}" if name else ""), spec, num_classes


def _no_row_message(found: MiTVariant) -> str:
  mine = _fields(found)
  differences = []
  for name, row in VARIANTS.items():
    theirs = _fields(row)
    differences.append(
      ([f"{k} {mine[k]} vs {theirs[k]}" for k in mine if mine[k] != theirs[k]], name)
    )
  closest, name = min(differences, key=lambda d: len(d[0]))
  return (
    f"--checkpoint: its SegFormer (channels {found.channels}, depths {found.depths}, "
    f"decoder width {found.decoder_width}) is no row of transkd_jax/models/variants.py; "
    f"closest mit_{name} differs in {'; '.join(closest)}. Heads cannot be read off "
    "the shapes: pass --heads=h1,h2,h3,h4 to export this custom variant"
  )


def _check_shapes(variables, spec, num_classes, what, family="segformer"):
  expected = {
    path: jax.ShapeDtypeStruct(shape, np.float32)
    for path, shape in convert.expected_shapes(spec, num_classes, family).items()
  }
  expected = traverse_util.unflatten_dict(expected)
  expected.setdefault("batch_stats", {})  # PVTv2 has none
  check_variables(variables, expected, "--checkpoint", f"{what} with {num_classes} classes")


def model_family(variables) -> str:
  """The family of a parameter tree: PVTv2 has a neck, LVT a convolutional self-attention
  (encoder/block1_0/attn/attn), SegFormer neither."""
  params = variables.get("params", {})
  if "neck" in params:
    return "pvtv2"
  if "attn" in ((params.get("encoder", {}).get("block1_0") or {}).get("attn") or {}):
    return "lvt"
  return "segformer"


def recorded_model(checkpoint: str):
  """(family, variant) that a transkd_jax.convert output's record names, else (None, None)."""
  path = storage.join(storage.resolve(checkpoint), convert.META_FILE)
  try:
    meta = json.loads(storage.read_text(path)) if storage.exists(path) else {}
  except (OSError, ValueError):
    meta = {}
  if not isinstance(meta, dict):
    return None, None
  family, variant = meta.get("family"), meta.get("variant")
  if family not in convert.FAMILIES or not isinstance(variant, str) or variant == "custom":
    return None, None
  return family, variant


def infer_model(variables, checkpoint: str = "", heads=None):
  """(family, arch name or "", variant row, num_classes) of a checkpoint's variables.

  The family and variant come from the convert record when ``checkpoint`` has
  one, else from the tree and its shapes; the shapes are checked against them.
  """
  recorded_family, variant = recorded_model(checkpoint) if checkpoint else (None, None)
  family = model_family(variables)
  if recorded_family is not None and recorded_family != family:
    raise UserError(
      f"--checkpoint: its {convert.META_FILE} says {recorded_family} but its "
      f"parameters are a {family}'s"
    )
  if family == "segformer":
    name, spec, num_classes = infer_variant(variables, heads)
    return family, name, spec, num_classes
  if heads is not None:
    raise UserError(
      f"--heads: only SegFormer variants need heads; --checkpoint holds a {convert.LABELS[family]}"
    )
  if family == "pvtv2":
    flat, shape = _param_shapes(variables, "PVTv2", "PVTv2")
    num_classes = shape("head", "conv_seg", "kernel")[-1]
  else:
    flat, shape = _param_shapes(variables, "LVT", "LVT")
    num_classes = shape("head", "linear_pred", "kernel")[-1]
  if variant is None:
    infer = infer_pvt_variant if family == "pvtv2" else infer_lvt_variant
    variant = infer(flat, shape)
  try:
    _, spec, _, name = convert.resolve_arch(f"pvt_v2_{variant}" if family == "pvtv2" else variant)
  except UserError as e:
    raise UserError(
      f"--checkpoint: its {convert.META_FILE} names no known {family} variant ({e})"
    ) from None
  _check_shapes(variables, spec, num_classes, convert.model_label(family, name), family)
  return family, name, spec, num_classes


def infer_pvt_variant(flat, shape) -> str:
  """The PVT_VARIANTS row (b0 .. b5) a PVTv2's shapes are; UserError naming the closest."""
  channels, depths, sr_ratios, mlp_ratios = _mit_encoder(flat, shape)
  neck_width = shape("neck", "lateral_convs_0", "kernel")[-1]
  found = MiTVariant(channels, depths, (0, 0, 0, 0), neck_width, mlp_ratios, sr_ratios)
  return _table_row(
    found, PVT_VARIANTS, "PVTv2", "pvt_v2_", "PVT_VARIANTS in transkd_jax/models/pvtv2.py"
  )


def infer_lvt_variant(flat, shape) -> str:
  """The LVT_VARIANTS row an LVT's shapes are; UserError naming the closest."""
  channels = tuple(shape("encoder", f"patch_embed{s}", "proj", "kernel")[-1] for s in range(1, 5))
  depths = tuple(
    len(
      {
        p[1]
        for p in flat
        if p[0] == "encoder" and len(p) > 1 and re.fullmatch(rf"block{s}_\d+", p[1])
      }
    )
    for s in range(1, 5)
  )

  def fields(row):
    return {
      "channels": tuple(row.channels),
      "depths": tuple(row.depths),
      "decoder width": row.decoder_width,
    }

  mine = {
    "channels": channels,
    "depths": depths,
    "decoder width": shape("head", "linear_fuse", "kernel")[-1],
  }
  for name, row in LVT_VARIANTS.items():
    if fields(row) == mine:
      return name
  closest = "; ".join(
    f"{k} {mine[k]} vs {v}" for k, v in fields(LVT_VARIANTS["lvt"]).items() if mine[k] != v
  )
  raise UserError(
    f"--checkpoint: its LVT is no row of LVT_VARIANTS in "
    f"transkd_jax/models/lvt.py; lvt differs in {closest}"
  )


def _table_row(found: MiTVariant, table, label: str, prefix: str, where: str) -> str:
  mine = _fields(found)
  differences = []
  for name, row in table.items():
    theirs = _fields(row)
    wrong = [f"{k} {mine[k]} vs {theirs[k]}" for k in mine if mine[k] != theirs[k]]
    if not wrong:
      return name
    differences.append((wrong, name))
  closest, name = min(differences, key=lambda d: len(d[0]))
  raise UserError(
    f"--checkpoint: its {label} (channels {found.channels}, depths "
    f"{found.depths}) is no row of {where}; closest {prefix}{name} differs in "
    f"{'; '.join(closest)}"
  )


# --------------------------------------------------------------------------
# What the checkpoint says about its inputs
# --------------------------------------------------------------------------


def input_settings(checkpoint: str, choice: str, source: str = ""):
  """(normalization, why, image_size or None, data config or None) for ``--normalization``."""
  path = storage.resolve(checkpoint)
  config = normalization_lib.run_config(path, source)
  data = (config or {}).get("data") or {}
  transforms = data.get("transforms", data.get("protocol", "reference"))
  image_size = None
  if config is not None and transforms != "mmseg" and len(config.get("image_size") or ()) == 2:
    image_size = tuple(int(v) for v in config["image_size"])
  if choice != "auto":
    return choice, "--normalization", image_size, data or None
  recorded, why = normalization_lib.recorded(path, source)
  if recorded is not None:
    return recorded, why, image_size, data or None
  return "unit", "the default (TransKD's [0, 1] inputs)", None, None


def class_names(num_classes: int, data_config=None):
  """The dataset's names; without a dataset, the one table with that many classes; else class_i."""
  import ml_collections

  from transkd_jax.data import classes

  if data_config:
    try:
      return tuple(classes.class_names(ml_collections.ConfigDict(dict(data_config)), num_classes))
    except (AttributeError, KeyError):  # a config without the dataset's keys
      pass
  tables = {names for names in classes.CLASS_NAMES.values() if len(names) == num_classes}
  if len(tables) == 1:
    return tables.pop()
  return tuple(f"class_{i}" for i in range(num_classes))


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


def hf_config(spec: MiTVariant, num_classes: int, names, num_channels: int = 3) -> dict:
  """transformers' SegformerConfig fields for ``spec`` (as config.json holds them)."""
  return {
    "architectures": ["SegformerForSemanticSegmentation"],
    "model_type": "segformer",
    "num_channels": num_channels,
    "num_encoder_blocks": 4,
    "depths": list(spec.depths),
    "hidden_sizes": list(spec.channels),
    "num_attention_heads": list(spec.heads),
    "sr_ratios": list(spec.sr_ratios),
    "mlp_ratios": list(spec.mlp_ratios),
    "patch_sizes": [kernel for kernel, _, _ in PATCH_GEOMETRY],
    "strides": [stride for _, stride, _ in PATCH_GEOMETRY],
    "decoder_hidden_size": spec.decoder_width,
    "hidden_act": "gelu",  # exact (erf) GELU, as the Flax model
    "layer_norm_eps": EPS_BLOCK,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "classifier_dropout_prob": spec.head_dropout,
    "drop_path_rate": spec.drop_path_rate,
    "initializer_range": 0.02,
    "reshape_last_stage": True,
    "semantic_loss_ignore_index": IGNORE_INDEX,
    "num_labels": num_classes,
    "id2label": {str(i): name for i, name in enumerate(names)},
    "label2id": {name: i for i, name in enumerate(names)},
  }


def preprocessor_config(normalization: str, image_size=None) -> dict:
  """SegformerImageProcessor settings: [0, 1] pixels, then ``normalization``'s mean/std."""
  mean, std = IMAGE_STATS[normalization]
  height, width = image_size or (512, 512)
  return {
    "image_processor_type": "SegformerImageProcessor",
    "do_resize": image_size is not None,
    "size": {"height": int(height), "width": int(width)},
    "resample": PIL_BILINEAR,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": mean,
    "image_std": std,
    "do_reduce_labels": False,
  }


def _write_json(path: str, obj):
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")
  os.replace(path + ".tmp", path)


def write_hf(public, spec, num_classes, output, normalization, image_size, names):
  from safetensors.numpy import save_file

  tensors = {k: np.array(v, order="C") for k, v in convert.public_to_hf(public).items()}
  path = os.path.join(output, "model.safetensors")
  save_file(tensors, path + ".tmp", metadata={"format": "pt"})
  os.replace(path + ".tmp", path)
  in_channels = public["patch_embed1.proj.weight"].shape[1]
  _write_json(os.path.join(output, "config.json"), hf_config(spec, num_classes, names, in_channels))
  _write_json(
    os.path.join(output, "preprocessor_config.json"), preprocessor_config(normalization, image_size)
  )


def _torch():
  try:
    import torch
  except ImportError:
    raise UserError(
      "--format=pytorch needs torch (pip install -e \".[torch]\"); --format=hf needs none"
    ) from None
  return torch


def write_pytorch(public, output):
  torch = _torch()
  path = os.path.join(output, "model.pth")
  torch.save({k: torch.from_numpy(v) for k, v in public.items()}, path + ".tmp")
  os.replace(path + ".tmp", path)


def export(
  checkpoint: str,
  fmt: str,
  output: str,
  normalization: str = "auto",
  heads=None,
  overwrite: bool = False,
) -> str:
  """Writes ``output``; returns the line saying what was written."""
  from transkd_jax.checkpoint import restore_model_variables

  if fmt not in FORMATS:
    raise UserError(f"--format={fmt!r}: expected one of {', '.join(FORMATS)}")
  if fmt in ("pytorch", "public"):
    _torch()  # before anything is written
  if normalization not in NORMALIZATIONS:
    raise UserError(
      f"--normalization={normalization!r}: expected one of {', '.join(NORMALIZATIONS)}"
    )
  output = os.path.abspath(os.path.expanduser(output))
  if os.path.exists(output) and not os.path.isdir(output):
    raise UserError(f"--output {output} is a file; expected a directory to write")
  if os.path.exists(output) and not overwrite:
    raise UserError(f"--output {output} exists; choose a new directory or pass --overwrite")

  variables, source = restore_model_variables(checkpoint, "--checkpoint", with_source=True)
  family, name, spec, num_classes = infer_model(variables, checkpoint, heads)
  label = convert.LABELS[family]
  if fmt == "hf" and family != "segformer":
    raise UserError(
      f"--format=hf: the HuggingFace export is for SegFormer only; --checkpoint "
      f"holds a {label} ({name}). --format=pytorch writes it in the public "
      "code's layout"
    )
  public = convert.to_public_state_dict(variables, family)
  what = f"{name or 'custom MiT ' + str(spec.channels)}, {num_classes} classes"
  os.makedirs(output, exist_ok=True)
  if fmt in ("pytorch", "public"):
    write_pytorch(public, output)
    return (
      f"wrote {os.path.join(output, 'model.pth')} (public {label} layout; {what}) from {source}"
    )
  norm, why, image_size, data = input_settings(checkpoint, normalization, source)
  write_hf(public, spec, num_classes, output, norm, image_size, class_names(num_classes, data))
  return (
    f"wrote {output} (HuggingFace SegFormer; {what}; {norm} normalisation from {why}) from {source}"
  )


def _parse_heads(text: str):
  try:
    heads = tuple(int(h) for h in text.split(","))
  except ValueError:
    heads = ()
  if len(heads) != 4:
    raise UserError(f"--heads={text!r}: expected four comma-separated integers, e.g. 1,2,5,8")
  return heads


def main(argv=None):
  parser = argparse.ArgumentParser(
    prog="python -m transkd_jax.export",
    description="Export a SegFormer, PVTv2 or LVT (a run's workdir or a transkd_jax.convert "
    "directory) as a public-layout PyTorch state dict (all three) or a "
    "HuggingFace transformers directory (SegFormer).",
  )
  parser.add_argument(
    "--checkpoint",
    required=True,
    help="a training run's workdir or a directory transkd_jax.convert wrote",
  )
  parser.add_argument(
    "--format",
    required=True,
    help="pytorch (alias public): model.pth with the public TransKD code's "
    "names, for SegFormer, PVTv2 and LVT; hf: a HuggingFace "
    "SegformerForSemanticSegmentation directory (SegFormer only)",
  )
  parser.add_argument("--output", required=True, help="directory to write")
  parser.add_argument(
    "--normalization",
    default="auto",
    help="hf: the inputs the model expects: auto (from the checkpoint), "
    "unit ([0, 1] pixels) or imagenet (mean/std)",
  )
  parser.add_argument(
    "--heads",
    default=None,
    help="attention heads per stage, e.g. 1,2,5,8; needed only for SegFormer "
    "variants that are no row of transkd_jax/models/variants.py",
  )
  parser.add_argument(
    "--overwrite",
    action="store_true",
    help="write into an existing --output, replacing the files it writes",
  )
  args = parser.parse_args(argv)
  try:
    heads = _parse_heads(args.heads) if args.heads is not None else None
    line = export(
      args.checkpoint, args.format, args.output, args.normalization, heads, args.overwrite
    )
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(line)
  return 0


if __name__ == "__main__":
  sys.exit(main())
