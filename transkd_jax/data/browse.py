"""Look at one example as the model sees it: image, label and overlay PNGs.

    python -m transkd_jax.data.browse --config=configs/cityscapes.py --split=val \\
        --index=0 --outdir=/tmp/browse [--config.data.root=...]

writes ``<name>_image.png``, ``<name>_label.png`` (the dataset's palette; ignored
pixels black) and ``<name>_overlay.png`` for example ``--index`` of the split, after
the config's transforms: the training transform (its random crop, flip and shift,
drawn from ``config.seed`` and the index) for ``train``, the evaluation transform
for ``val``. The label is written at the size the loss or the evaluation sees it
(under the ``reference`` protocol a quarter of the input for ``val``); the overlay
shows it stretched to the image (nearest neighbour). Works for every dataset the
config can name; ``--outdir`` may be a gs:// URI.
"""

import sys

import numpy as np
from absl import flags
from ml_collections import config_flags
from PIL import Image

from transkd_jax import storage
from transkd_jax.data import classes, transforms
from transkd_jax.data.datasets import make_source
from transkd_jax.data.labels import IGNORE
from transkd_jax.errors import UserError

SPLITS = ("train", "val")
OVERLAY_ALPHA = 0.5


def view(config, split: str, index: int) -> dict:
  """{"name", "image" (H x W x 3 uint8), "label" (h x w uint8, IGNORE where ignored)}:
  example ``index`` of ``split`` after the config's transforms."""
  split_name = config.train_split if split == "train" else config.eval_split
  source = make_source(config.data, split_name, config.num_classes)
  if not 0 <= index < len(source):
    raise UserError(f"--index={index}: the {split_name} split holds {len(source)} examples")
  example = source[index]
  if split == "train":
    rng = np.random.default_rng([config.seed, index])
    out = transforms.train_transform(config)(example, rng)
  else:
    out = transforms.eval_transform(config)(example)
  image = np.asarray(out["image"])
  if image.dtype != np.uint8:  # transforms that hand over normalised floats
    image = np.clip(np.rint(255 * (image - image.min()) / max(np.ptp(image), 1e-6)), 0, 255)
  name = str(example.get("name", f"{split_name}_{index}")).replace("/", "_")
  return {"name": name, "image": image.astype(np.uint8), "label": np.asarray(out["label"])}


def pictures(viewed: dict, colours: np.ndarray) -> dict:
  """{"image", "label", "overlay"} uint8 RGB arrays of a ``view``."""
  label = viewed["label"]
  shown = np.zeros((*label.shape, 3), np.uint8)
  known = label != IGNORE
  shown[known] = classes.colorize(label[known], colours)
  h, w = viewed["image"].shape[:2]
  stretched = np.asarray(Image.fromarray(shown).resize((w, h), Image.NEAREST))
  return {
    "image": viewed["image"],
    "label": shown,
    "overlay": classes.overlay(viewed["image"], stretched, OVERLAY_ALPHA),
  }


def write(config, split: str, index: int, outdir: str) -> list:
  """Writes the three PNGs; returns their paths."""
  viewed = view(config, split, index)
  storage.makedirs(outdir)
  paths = []
  for kind, array in pictures(viewed, classes.palette(config.data, config.num_classes)).items():
    path = storage.join(outdir, f"{viewed['name']}_{kind}.png")
    with storage.staged(path) as local:
      Image.fromarray(array).save(local, format="PNG")
    paths.append(path)
  return paths


def cli(argv) -> int:
  """The command line (its own flags: it runs beside main's in one process)."""
  values = flags.FlagValues()
  config = config_flags.DEFINE_config_file(
    "config", None, "A config file (configs/*.py).", flag_values=values, sys_argv=list(argv)
  )
  split = flags.DEFINE_enum(
    "split", "val", SPLITS, "train: the training transform; val: eval's.", flag_values=values
  )
  index = flags.DEFINE_integer("index", 0, "The example's index in the split.", flag_values=values)
  outdir = flags.DEFINE_string(
    "outdir", None, "Where the PNGs go (created if missing).", flag_values=values
  )
  try:
    rest = values(argv)
    if len(rest) > 1:
      raise UserError(f"unexpected arguments: {' '.join(rest[1:])}")
    if config.value is None:
      raise UserError("no config: pass --config=configs/<name>.py")
    if not outdir.value:
      raise UserError("--outdir is required (a directory for the PNGs)")
    for path in write(config.value, split.value, index.value, outdir.value):
      print(path)
  except (UserError, flags.Error) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(cli(sys.argv))
