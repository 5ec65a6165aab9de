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

import json
import re
from typing import Optional, Tuple

import jax.numpy as jnp
import numpy as np

from transkd_jax import storage

NORMALIZATIONS = ("unit", "imagenet")
MEAN = np.array([123.675, 116.28, 103.53], np.float32)  # ImageNet, RGB, 0-255 pixels
STD = np.array([58.395, 57.12, 57.375], np.float32)
CONVERT_RECORD = "transkd_convert.json"  # written by transkd_jax.convert beside its checkpoint


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


def run_config(path: str, source: str = "") -> Optional[dict]:
  """A run workdir's saved config (JSON): the step named in ``source`` first, else the newest."""
  directory = storage.join(path, "checkpoints")
  if not storage.isdir(directory):
    return None
  from etils import epath

  steps = sorted(
    (int(p.name) for p in epath.Path(directory).iterdir() if p.name.isdigit()), reverse=True
  )
  match = re.search(r"checkpoints/(\d+)", source)
  if match:
    steps.insert(0, int(match.group(1)))
  for step in steps:
    for file in sorted(epath.Path(directory, str(step), "config").glob("*")):
      try:
        config = json.loads(file.read_text())
      except (OSError, ValueError):
        continue
      if isinstance(config, dict):
        return config
  return None


def recorded(path: str, source: str = "") -> Tuple[Optional[str], str]:
  """(normalisation, where it was read) that the checkpoint at ``path`` expects.

  A run's workdir: its ``data.transforms``. A ``transkd_jax.convert`` output: its
  record. Otherwise (None, "nothing recorded").
  """
  config = run_config(path, source)
  if config is not None:
    data = config.get("data") or {}
    key = "transforms" if "transforms" in data else "protocol"  # protocol: the older name
    transforms = data.get(key, "reference")
    return of_transforms(transforms), f"the run's config.data.{key}={transforms!r}"
  record = storage.join(path, CONVERT_RECORD)
  if storage.exists(record):
    try:
      value = json.loads(storage.read_text(record)).get("normalization")
    except (OSError, ValueError, AttributeError):
      value = None
    if value in NORMALIZATIONS:
      return value, f"{CONVERT_RECORD} (normalization={value!r})"
  return None, "nothing recorded"
