"""The generated street scenes written as a folder dataset (``config.data.name="folder"``,
``folder.py``), for a first run on one's "own" data:

    python -m transkd_jax.data.folder_example /tmp/folder-data [--count=60] [--size=128x256]

writes ``images/scene_NNNN.jpg``, ``masks/scene_NNNN.png`` (the scenes' Cityscapes label
ids, 0-33, as stored) and ``classes.json``: Cityscapes' seven categories as the classes,
a palette, and a ``map`` from each label id to its category (the void ids ignored).
``configs/folder.py`` trains on it; the directory may be a gs:// URI.
"""

import argparse
import json
import os
import sys

import numpy as np
from cityscapesscripts.helpers.labels import labels as _CITYSCAPES_LABELS
from PIL import Image

from transkd_jax import storage
from transkd_jax.data import generated
from transkd_jax.data.labels import IGNORE
from transkd_jax.errors import UserError

# Cityscapes' seven categories (its void category ignored), each coloured as one of its classes.
NAMES = ("flat", "construction", "object", "nature", "sky", "human", "vehicle")
PALETTE = (
  (128, 64, 128),
  (70, 70, 70),
  (220, 220, 0),
  (107, 142, 35),
  (70, 130, 180),
  (220, 20, 60),
  (0, 0, 142),
)


def classes() -> dict:
  """The example's class file: Cityscapes label id -> its category (void: ignored)."""
  mapping = {
    str(label.id): label.categoryId - 1 if label.categoryId > 0 else IGNORE
    for label in _CITYSCAPES_LABELS
    if 0 <= label.id < 256
  }
  return {
    "names": list(NAMES),
    "palette": [list(c) for c in PALETTE],
    "ignore": IGNORE,
    "map": mapping,
  }


def class_file_text(value: dict) -> str:
  """JSON with one key per line (short enough to read and edit)."""
  lines = [f"  {json.dumps(key)}: {json.dumps(item)}" for key, item in value.items()]
  return "{\n" + ",\n".join(lines) + "\n}\n"


def _save(array: np.ndarray, path: str, kind: str, **options):
  with storage.staged(path) as local:
    Image.fromarray(array).save(local, format=kind, **options)


def write(root: str, count: int = 60, size=(128, 256), seed: int = 0) -> str:
  """``count`` generated scenes (``seed``, indices 0..count-1, ``size`` = (h, w)) as a
  folder dataset under ``root``, a new directory (or one without images/, masks/ and
  classes.json); returns ``root`` resolved."""
  if count < 2:
    raise UserError(f"--count={count}: write at least 2 scenes (one for train, one for val)")
  root = storage.resolve(root)
  for sub in ("images", "masks", "classes.json"):
    if storage.exists(os.path.join(root, sub)):
      raise UserError(f"{os.path.join(root, sub)} exists; write the example to a new directory")
  for sub in ("images", "masks"):
    storage.makedirs(os.path.join(root, sub))
  for i in range(count):
    image, label = generated.generate_scene(seed, i, tuple(size))
    _save(image, os.path.join(root, "images", f"scene_{i:04d}.jpg"), "JPEG", quality=95)
    _save(label, os.path.join(root, "masks", f"scene_{i:04d}.png"), "PNG")
  storage.write_text(os.path.join(root, "classes.json"), class_file_text(classes()))
  return root


def cli(argv) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m transkd_jax.data.folder_example",
    description="Write the generated street scenes as a folder dataset (config.data.name=folder).",
  )
  parser.add_argument("root", metavar="DIR", help="a new directory (local or gs://...)")
  parser.add_argument("--count", type=int, default=60, help="scenes (default 60)")
  parser.add_argument("--size", default="128x256", help="HEIGHTxWIDTH (default 128x256)")
  parser.add_argument("--seed", type=int, default=0, help="the generator's seed (default 0)")
  args = parser.parse_args(argv[1:])
  try:
    try:
      size = tuple(int(s) for s in args.size.lower().split("x"))
    except ValueError:
      size = ()
    if len(size) != 2 or min(size) < 1:
      raise UserError(f"--size={args.size!r}: expected HEIGHTxWIDTH, e.g. 128x256")
    root = write(args.root, args.count, size, args.seed)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(
    f"wrote {args.count} scenes ({size[0]}x{size[1]}) to {root}: images/*.jpg, masks/*.png "
    f"(Cityscapes label ids), classes.json ({len(NAMES)} classes: {', '.join(NAMES)})"
  )
  return 0


if __name__ == "__main__":
  sys.exit(cli(sys.argv))
