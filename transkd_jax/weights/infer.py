"""Which model weights are: the family and the variant, read off names and shapes.

``infer_model`` is the one reader, for a state dict in any layout
``transkd_jax.convert`` reads and for a Flax variables tree alike: both are
viewed as {public name: PyTorch shape} (``layouts.torch_name``), the family
comes from the names, the variant from the shapes matched against the family's
table in ``transkd_jax.models.archs.ARCHS``.
"""

import re
from collections.abc import Mapping
from typing import Optional, Tuple

import jax
import numpy as np
from flax import traverse_util

from transkd_jax.checkpoint import check_variables
from transkd_jax.errors import UserError
from transkd_jax.models import archs
from transkd_jax.models.variants import MiTVariant
from transkd_jax.normalization import CONVERT_RECORD
from transkd_jax.weights import names as names_lib
from transkd_jax.weights.arch import model_label
from transkd_jax.weights.layouts import torch_name, torch_shape
from transkd_jax.weights.model import expected_shapes


def is_tree(weights) -> bool:
  """Whether ``weights`` are Flax variables ({"params": ...}) rather than a state dict."""
  return isinstance(weights, Mapping) and isinstance(weights.get("params"), Mapping)


def tree_family(variables) -> str:
  """The family of a parameter tree: PVTv2 has a neck, LVT a convolutional self-attention
  (encoder/block1_0/attn/attn), SegFormer neither."""
  params = variables.get("params", {})
  if "neck" in params:
    return "pvtv2"
  if "attn" in ((params.get("encoder", {}).get("block1_0") or {}).get("attn") or {}):
    return "lvt"
  return "segformer"


def names_family(names) -> Optional[str]:
  """The family a checkpoint's unwrapped names look like, or None."""
  if names_lib.is_lvt(names):
    return "lvt"
  if names_lib.is_hf_pvt(names) or any(n.startswith(names_lib.PVT_DECODER) for n in names):
    return "pvtv2"
  if names_lib.is_hf(names) or any(
    n.startswith(("decode_head.",) + archs.ARCHS["segformer"].public.decoder) for n in names
  ):
    return "segformer"
  # A bare encoder: PVTv2 B0-B4's first Mix-FFNs are 8 times wider, MiT's 4 times.
  fc1 = names.get("block1.0.mlp.fc1.weight", names.get("backbone.block1.0.mlp.fc1.weight"))
  if fc1 is not None and np.ndim(fc1) == 2:
    return "pvtv2" if fc1.shape[0] == 8 * fc1.shape[1] else "segformer"
  return None


class _Shapes:
  """{public name: PyTorch shape} of weights; lookups by the Flax path under params."""

  def __init__(self, shapes, family: str, what: str, optional_decoder: bool):
    self.shapes, self.family, self.what = shapes, family, what
    self.optional_decoder = optional_decoder  # a state dict may be a bare encoder
    self.label = archs.ARCHS[family].label

  def __call__(self, *path, optional=False):
    name = torch_name(("params",) + path, self.family)
    if name in self.shapes:
      return self.shapes[name]
    if optional or (self.optional_decoder and path[0] != "encoder"):
      return None
    raise UserError(
      f"{self.what} holds no {self.label} parameter params/{'/'.join(path)} "
      f"(expected the variables of transkd_jax.models.{self.label})"
    )


def _view(weights, what: str):
  """(family, _Shapes) of a Flax tree or a state dict."""
  if is_tree(weights):
    family = tree_family(weights)
    shapes = {}
    for path, leaf in traverse_util.flatten_dict(weights["params"]).items():
      try:
        shapes[torch_name(("params",) + path, family)] = torch_shape(np.shape(leaf))
      except (ValueError, KeyError):  # no public name: check_variables names it later
        pass
    return family, _Shapes(shapes, family, what, optional_decoder=False)
  state, _, _ = names_lib.unwrap(weights)
  family = names_family(state)
  if family is None:
    raise UserError(f"{what}: the names are none of SegFormer's, PVTv2's or LVT's")
  public = names_lib.to_public_names(state, family)
  shapes = {name: tuple(np.shape(value)) for name, value in public.items()}
  return family, _Shapes(shapes, family, what, optional_decoder=True)


def _depths(shape: _Shapes):
  """Blocks per stage; UserError unless a stage's blocks are numbered 0..n-1."""
  depths = []
  for s in range(1, 5):
    pattern = re.compile(archs.ARCHS[shape.family].public.blocks.format(s=s, s0=s - 1))
    blocks = {int(m.group(1)) for n in shape.shapes for m in [pattern.match(n)] if m}
    if blocks != set(range(len(blocks))):
      raise UserError(f"{shape.what}: stage {s}'s blocks are not numbered 0..n-1: {sorted(blocks)}")
    depths.append(len(blocks))
  return tuple(depths)


def _found_fields(shape: _Shapes) -> dict:
  """The variant-table fields the shapes show (None: not in the weights)."""
  channels = tuple(shape("encoder", f"patch_embed{s}", "proj", "kernel")[0] for s in range(1, 5))
  depths = _depths(shape)
  width = shape(*archs.ARCHS[shape.family].public.decoder_width)
  fields = {
    "channels": channels,
    "depths": depths,
    "decoder width": None if width is None else width[0],
  }
  if shape.family == "lvt":
    return fields
  sr_ratios, mlp_ratios = [], []
  for s, depth in enumerate(depths, 1):
    sr = shape("encoder", f"block{s}_0", "attn", "sr", "kernel", optional=True)
    sr_ratios.append(sr[-1] if sr else 1)
    ratios = set()
    for j in range(depth):
      fc1 = shape("encoder", f"block{s}_{j}", "mlp", "fc1", "kernel")
      ratios.add(fc1[0] / fc1[1])
    if len(ratios) > 1 or not float(next(iter(ratios), 4)).is_integer():
      raise UserError(
        f"{shape.what}: stage {s}'s Mix-FFN widths are not one integer multiple "
        f"of its channels (ratios {sorted(ratios)})"
      )
    mlp_ratios.append(int(next(iter(ratios), 4)))
  fields["mlp ratios"] = tuple(mlp_ratios)
  fields["sr ratios"] = tuple(sr_ratios)
  return fields


def _fields(row, family: str) -> dict:
  fields = {
    "channels": tuple(row.channels),
    "depths": tuple(row.depths),
    "decoder width": row.decoder_width,
  }
  if family != "lvt":
    fields["mlp ratios"] = tuple(row.mlp_ratios)
    fields["sr ratios"] = tuple(row.sr_ratios)
  return fields


def _table_row(found: dict, family: str):
  """(variant name, None) of the table row ``found`` is, else (None, the closest row's name
  and its differences)."""
  mine = {k: v for k, v in found.items() if v is not None}
  differences = []
  for name, row in archs.ARCHS[family].variants.items():
    theirs = _fields(row, family)
    wrong = [f"{k} {mine[k]} vs {theirs[k]}" for k in mine if mine[k] != theirs[k]]
    if not wrong:
      return name, None
    differences.append((wrong, name))
  return None, min(differences, key=lambda d: len(d[0]))


def _no_row(found: dict, family: str, closest, what: str) -> str:
  row = archs.ARCHS[family]
  wrong, name = closest
  seen = f"channels {found['channels']}, depths {found['depths']}"
  if family == "segformer":
    seen += f", decoder width {found['decoder width']}"
  table = row.get_variant.__module__.replace(".", "/") + ".py"
  message = (
    f"{what}: its {row.label} ({seen}) is no row of the {row.label} variant table ({table}); "
    f"closest {row.checkpoint_names[name]} differs in {'; '.join(wrong)}"
  )
  if family == "segformer":
    message += (
      ". Heads cannot be read off the shapes: pass --heads=h1,h2,h3,h4 to export this "
      "custom variant"
    )
  return message


def _check_heads(heads, channels) -> Tuple[int, ...]:
  heads = tuple(int(h) for h in heads)
  if len(heads) != 4 or any(h < 1 or c % h for h, c in zip(heads, channels)):
    raise UserError(
      f"--heads={','.join(map(str, heads))}: expected 4 positive head counts, "
      f"each dividing its stage's channels {channels}"
    )
  return heads


def check_shapes(variables, spec, num_classes: int, family: str, description: str):
  """UserError naming every variable of ``variables`` that ``spec``'s model lacks or shapes
  otherwise."""
  expected = {
    path: jax.ShapeDtypeStruct(shape, np.float32)
    for path, shape in expected_shapes(spec, num_classes, family).items()
  }
  expected = traverse_util.unflatten_dict(expected)
  expected.setdefault("batch_stats", {})  # PVTv2 has none
  check_variables(variables, expected, "--checkpoint", f"{description} with {num_classes} classes")


def infer_model(weights, heads=None, recorded=(None, None), what: str = "--checkpoint"):
  """(family, arch name or "", variant row, num_classes) of weights: a Flax variables tree or
  a state dict (any layout convert reads; num_classes None for a bare encoder).

  ``recorded``: the (family, variant) a convert record names (``record.recorded_model``):
  the family must be the tree's, and a PVTv2 / LVT variant is taken from it. A
  SegFormer's variant is always read off the shapes; its heads leave no trace there,
  so one that is no table row needs ``heads``. A tree's shapes are then checked
  against the variant. Raises UserError naming what is missing or does not match.
  """
  family, shape = _view(weights, what)
  recorded_family, variant = recorded
  if recorded_family is not None and recorded_family != family:
    raise UserError(
      f"{what}: its {CONVERT_RECORD} says {recorded_family} but its parameters are a {family}'s"
    )
  row = archs.ARCHS[family]
  if family != "segformer" and heads is not None:
    raise UserError(f"--heads: only SegFormer variants need heads; {what} holds a {row.label}")
  classes = shape(*row.public.classes)
  num_classes = None if classes is None else classes[0]
  if family == "segformer" or variant is None:
    found = _found_fields(shape)
    variant, closest = _table_row(found, family)
    if variant is None and (family != "segformer" or heads is None):
      raise UserError(_no_row(found, family, closest, what))
  if variant is not None:
    try:
      spec = row.get_variant(variant)
    except ValueError as e:
      raise UserError(
        f"{what}: its {CONVERT_RECORD} names no known {family} variant ({e})"
      ) from None
  if family == "segformer":
    if heads is None:
      heads = spec.heads
    heads = _check_heads(heads, found["channels"])
    if variant is None or spec.heads != heads:  # the table's shapes with other heads: custom
      variant = None
      spec = MiTVariant(
        found["channels"],
        found["depths"],
        heads,
        found["decoder width"],
        found["mlp ratios"],
        found["sr ratios"],
      )
  name = row.checkpoint_names[variant] if variant is not None else ""
  if is_tree(weights):
    check_shapes(weights, spec, num_classes, family, model_label(family, name or "custom"))
  return family, name, spec, num_classes


def guess_arch(state) -> str:
  """The --arch a state dict looks like (mit_b2, pvt_v2_b0, lvt), or '' if unclear."""
  try:
    return infer_model(state, what="the checkpoint")[1]
  except UserError:
    return ""
