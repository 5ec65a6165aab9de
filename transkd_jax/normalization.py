"""Input normalisation: which one a model expects, and turning one into the other.

Two are in use:

- ``unit``: pixels / 255, in [0, 1], no mean or std. TransKD's own code trains and
  evaluates so (the ``reference`` and ``aligned`` transforms), and so were the teachers
  released with it.
- ``imagenet``: (pixels - mean) / std with ImageNet's statistics on 0-255 pixels. The
  official SegFormer weights (NVlabs ``.pth``, HuggingFace) and the ``mmseg`` transforms
  use it.

A checkpoint says which it expects: ``transkd_jax.convert`` records it
(``transkd_convert.json``, guessed from the source's layout or given with
``--input-norm``), and a run's saved config names its ``data.transforms``. The data
pipeline gives uint8 pixels; the steps normalise them on the device (``renormalize``),
for the student as its transforms say and for the teacher its own way.
"""

from typing import Optional, Tuple

import jax.numpy as jnp
import numpy as np

NORMALIZATIONS = ("unit", "imagenet")
# The record transkd_jax.convert writes beside its checkpoint (transkd_jax/checkpoint.py reads it).
CONVERT_RECORD = "transkd_convert.json"
MEAN = np.array([123.675, 116.28, 103.53], np.float32)  # ImageNet, RGB, 0-255 pixels
STD = np.array([58.395, 57.12, 57.375], np.float32)


def of_transforms(transforms: str) -> str:
  """The normalisation ``config.data.transforms`` produces."""
  return "imagenet" if transforms == "mmseg" else "unit"


def check(name: str, what: str) -> str:
  if name not in NORMALIZATIONS:
    raise ValueError(f"{what}={name!r}: expected one of {', '.join(NORMALIZATIONS)}")
  return name


def renormalize(images, source: str, target: str):
  """Images -> normalised as ``target``.

  uint8 images are raw 0-255 pixels (what the data pipeline gives): they are
  normalised to ``target`` in float32. Float images are taken as normalised as
  ``source`` and mapped exactly to the same pixels normalised as ``target``.
  """
  check(source, "source normalisation")
  check(target, "target normalisation")
  mean, std = jnp.asarray(MEAN), jnp.asarray(STD)
  if jnp.issubdtype(images.dtype, jnp.integer):
    pixels = images.astype(jnp.float32)
    return pixels / 255.0 if target == "unit" else (pixels - mean) / std
  if source == target:
    return images
  if source == "unit":  # pixels = 255 x
    return (images * 255.0 - mean) / std
  return (images * std + mean) / 255.0  # imagenet -> unit


def recorded(
  saved_config: Optional[dict], record: Optional[dict], record_name: str = "the convert record"
) -> Tuple[Optional[str], str]:
  """(normalisation, where it was read) that a checkpoint expects.

  ``saved_config``: a run workdir's saved config (its ``data.transforms``);
  ``record``: a ``transkd_jax.convert`` output's record (its ``normalization``);
  both as ``transkd_jax.checkpoint`` reads them. Otherwise (None, "nothing recorded").
  """
  if saved_config is not None:
    data = saved_config.get("data") or {}
    key = "transforms" if "transforms" in data else "protocol"  # protocol: the older name
    transforms = data.get(key, "reference")
    return of_transforms(transforms), f"the run's config.data.{key}={transforms!r}"
  value = (record or {}).get("normalization")
  if value in NORMALIZATIONS:
    return value, f"{record_name} (normalization={value!r})"
  return None, "nothing recorded"
