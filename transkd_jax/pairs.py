"""The teacher/student pairs a recipe runs: ``config.recipe.pairs`` parsed and checked.

    config.recipe.pairs = ("segformer-b2>segformer-b0", "pvtv2-b2>pvtv2-b0", "segformer-b2>lvt")

A model is written ARCH-VARIANT (``archs.ARCHS``' names); an empty tuple means the
config's own teacher -> student. ``config.validate_config`` checks the entries,
``transkd_jax.recipe`` runs them.
"""

import dataclasses
from typing import Tuple

from transkd_jax.errors import UserError
from transkd_jax.models import archs

ModelSpec = Tuple[str, str]  # (arch, variant)


@dataclasses.dataclass(frozen=True)
class Pair:
  """One teacher/student pair of the recipe."""

  teacher: ModelSpec
  student: ModelSpec
  subdir: str  # "" for the config's own pair, else "<teacher>_to_<student>"

  @property
  def title(self) -> str:
    return f"{archs.model_name(*self.teacher)} -> {archs.model_name(*self.student)}"


def parse_model(text: str, what: str) -> ModelSpec:
  """ "segformer-b2" -> ("segformer", "b2"); "lvt" -> ("lvt", "lvt"); errors name ``what``."""
  arch, _, variant = str(text).strip().lower().partition("-")
  variant = variant or arch
  try:
    archs.get_arch_variant(archs.check_arch(arch), variant)
  except ValueError as e:
    raise UserError(
      f"{what}: {text!r} is not a model ({e}); write ARCH-VARIANT, e.g. "
      "'segformer-b2', 'pvtv2-b0', or 'lvt'"
    ) from None
  return arch, variant


def _own(config) -> Tuple[ModelSpec, ModelSpec]:
  return (
    (config.teacher.arch, str(config.teacher.variant)),
    (config.student.arch, str(config.student.variant)),
  )


def _slug(spec: ModelSpec) -> str:
  arch, variant = spec
  return arch if variant == arch else f"{arch}-{variant}"


def pairs_of(config) -> list:
  """The recipe's pairs (``config.recipe.pairs``; empty: the config's own pair)."""
  own = _own(config)
  if not config.recipe.pairs:
    return [Pair(*own, "")]
  pairs = []
  for entry in config.recipe.pairs:
    what = f"config.recipe.pairs entry {entry!r}"
    teacher, sep, student = str(entry).partition(">")
    if not sep:
      raise UserError(f"{what}: expected 'TEACHER>STUDENT', e.g. 'pvtv2-b2>pvtv2-b0'")
    teacher, student = parse_model(teacher, what), parse_model(student, what)
    subdir = "" if (teacher, student) == own else f"{_slug(teacher)}_to_{_slug(student)}"
    pair = Pair(teacher, student, subdir)
    if pair in pairs:
      raise UserError(f"{what} is listed twice")
    pairs.append(pair)
  return pairs
