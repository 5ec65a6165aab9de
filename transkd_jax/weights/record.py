"""Writing converted weights: the Orbax checkpoint and its record (``META_FILE``, what
``transkd_jax.build.read_model`` and ``transkd_jax.export`` read back)."""

import orbax.checkpoint as ocp

from transkd_jax import checkpoint as ckpt_lib
from transkd_jax import storage
from transkd_jax.errors import UserError
from transkd_jax.models import archs
from transkd_jax.normalization import CONVERT_RECORD
from transkd_jax.weights.arch import resolve_arch

META_FILE = CONVERT_RECORD


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
  """``tree`` as an Orbax checkpoint at ``output`` (a local directory or a URI: Orbax
  writes both), with ``meta`` as its META_FILE."""
  output = storage.resolve(output)
  if storage.exists(output) and not overwrite:
    raise UserError(f"--output {output} exists; choose a new directory or pass --overwrite")
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(output, tree, force=overwrite)
  checkpointer.wait_until_finished()
  storage.write_json(storage.join(output, META_FILE), meta, indent=2)


def recorded_model(checkpoint: str):
  """(family, variant) that a transkd_jax.convert output's record names, else (None, None)."""
  meta = ckpt_lib.convert_record(storage.resolve(checkpoint)) or {}
  family, variant = meta.get("family"), meta.get("variant")
  if family not in archs.ARCHS or not isinstance(variant, str) or variant == "custom":
    return None, None
  return family, variant
