"""The Mix Transformer variant table (B0-B5), as data.

Every number comes from SegFormer's MiT definitions (docs/transkd.md#variants-b0-b5).
A variant is a row; nothing else in the code branches on the variant name.
"""

from typing import NamedTuple, Tuple


class MiTVariant(NamedTuple):
  channels: Tuple[int, int, int, int]
  depths: Tuple[int, int, int, int]
  heads: Tuple[int, int, int, int]
  decoder_width: int
  # Mix-FFN hidden width / channels, per stage. SegFormer's MiT uses 4 everywhere;
  # PVTv2 (transkd_jax/models/pvtv2.py) uses (8, 8, 4, 4) for B0-B4.
  mlp_ratios: Tuple[int, int, int, int] = (4, 4, 4, 4)
  # Shared by every MiT variant; kept in the row so a reader sees the whole spec.
  sr_ratios: Tuple[int, int, int, int] = (8, 4, 2, 1)
  drop_path_rate: float = 0.1
  head_dropout: float = 0.1


_WIDE = (64, 128, 320, 512)
_HEADS = (1, 2, 5, 8)

VARIANTS = {
  "b0": MiTVariant((32, 64, 160, 256), (2, 2, 2, 2), _HEADS, 256),
  "b1": MiTVariant(_WIDE, (2, 2, 2, 2), _HEADS, 256),
  "b2": MiTVariant(_WIDE, (3, 4, 6, 3), _HEADS, 768),
  "b3": MiTVariant(_WIDE, (3, 4, 18, 3), _HEADS, 768),
  "b4": MiTVariant(_WIDE, (3, 8, 27, 3), _HEADS, 768),
  "b5": MiTVariant(_WIDE, (3, 6, 40, 3), _HEADS, 768),
}

# Patch-embedding geometry per stage: (kernel, stride, padding).
PATCH_GEOMETRY = ((7, 4, 3), (3, 2, 1), (3, 2, 1), (3, 2, 1))


def lookup_row(name, table, row_type, family: str, prefix: str = ""):
  """``table``'s row for ``name`` (optionally written ``prefix`` + name); a ``row_type``
  passes through. Shared by the MiT, PVTv2 and LVT tables; the error names ``family``."""
  if isinstance(name, row_type):
    return name
  key = str(name).lower()
  if prefix and key.startswith(prefix):
    key = key[len(prefix) :]
  if key not in table:
    names = sorted(table)
    alias = f" (or {prefix}{names[0]} .. {prefix}{names[-1]})" if prefix else ""
    raise ValueError(
      f"Unknown {family} variant {name!r}; expected one of {', '.join(names)}{alias}."
    )
  return table[key]


def get_variant(name) -> MiTVariant:
  """The row for ``name`` ('b0'..'b5' or 'mit_b0'..'mit_b5'); a MiTVariant passes through.

  Passing a row of your own (e.g. B2 widths with fewer blocks) builds a custom
  MiT; tests use that to keep B2-shaped models small.
  """
  return lookup_row(name, VARIANTS, MiTVariant, "MiT", "mit_")
