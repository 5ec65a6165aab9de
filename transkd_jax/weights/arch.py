"""``--arch`` (mit_b2, pvt_v2_b0, lvt, or a variant row) -> family, variant row and names,
by the public checkpoint names of ``transkd_jax.models.archs.ARCHS``."""

import re
from typing import Any, Tuple

from transkd_jax.errors import UserError
from transkd_jax.models import archs
from transkd_jax.models.lvt import LVTVariant
from transkd_jax.models.variants import MiTVariant


def _spellings(row) -> str:
  names = list(row.checkpoint_names.values())
  return names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"


ACCEPTED = ", ".join(_spellings(row) for row in archs.ARCHS.values())


def _rows_are(family: str, kind) -> bool:
  """Whether ``family``'s variant table holds rows of ``kind``."""
  row = archs.ARCHS.get(family)
  return row is not None and all(isinstance(v, kind) for v in row.variants.values())


def _parse(key: str):
  """(family, variant name) an --arch spells, or None: a public name, a bare MiT variant
  (b0 .. b5), or a family's name stem with an unknown variant (named by the error)."""
  found = archs.from_checkpoint_name(key)
  if found is not None:
    return found
  if re.fullmatch(r"b\d+", key):
    return "segformer", key
  for family, row in archs.ARCHS.items():
    variant, public = next(iter(row.checkpoint_names.items()))
    stem = public.removesuffix(variant)
    if stem and key.startswith(stem):
      return family, key[len(stem) :]
    if not stem and key.startswith(public):  # a family of one variant: its name is the stem
      return family, key
  return None


def resolve_arch(arch, family=None) -> Tuple[str, Any, str, str]:
  """(family, variant row, variant name, arch name) of ``--arch``.

  ``arch``: mit_b0 .. mit_b5 (or b0 .. b5), pvt_v2_b0 .. pvt_v2_b5, lvt; or a
  variant row (a MiTVariant: SegFormer unless ``family="pvtv2"``; an
  LVTVariant), for which both names are "custom". Raises UserError naming the
  accepted values.
  """
  if isinstance(arch, (MiTVariant, LVTVariant)):
    families = [f for f in archs.ARCHS if _rows_are(f, type(arch))]
    family = family or families[0]  # a MiTVariant: SegFormer unless said otherwise
    if family not in families:
      labels = " or ".join(archs.ARCHS[f].label for f in families)
      raise ValueError(f"a {type(arch).__name__} row is a {labels} variant, not {family!r}")
    return family, arch, "custom", f"custom {archs.ARCHS[family].label}"
  parsed = _parse(str(arch).lower())
  if parsed is None:
    raise UserError(f"--arch={arch}: unknown architecture; expected one of {ACCEPTED}")
  family, name = parsed
  row = archs.ARCHS[family]
  try:
    spec = row.get_variant(name)
  except ValueError as e:
    raise UserError(f"--arch={arch}: {e} Accepted: {ACCEPTED}") from None
  return family, spec, name, row.checkpoint_names[name]


def model_label(family: str, arch_name: str) -> str:
  """ "PVTv2 pvt_v2_b0", "SegFormer mit_b2", "LVT lvt" (for messages)."""
  return f"{archs.ARCHS[family].label} {arch_name}"
