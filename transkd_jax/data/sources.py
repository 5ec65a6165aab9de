"""Random-access sources over datasets in their official layouts.

Every source has ``len()`` and ``[i]`` returning
``{"image": uint8 H x W x 3, "label": uint8 H x W train ids (255 ignored), "name": str}``,
which is what ``grain.MapDataset.source`` needs.

- ``cityscapes``: ``ROOT/leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with
  ``ROOT/gtFine/<split>/<city>/*_gtFine_labelTrainIds.png`` when present, else
  ``*_gtFine_labelIds.png`` mapped with cityscapesScripts' label table.
- ``generated``: the street-scene generator's tree (written on first use under
  ``config.data.root``, default ``~/.cache/transkd_jax/generated-...``), read
  through the Cityscapes source.
"""

import glob
import os
import warnings

import numpy as np
from PIL import Image

from transkd_jax.data import generated
from transkd_jax.data.classes import CITYSCAPES_ID_TO_TRAIN, IGNORE
from transkd_jax.errors import UserError

CITYSCAPES_LAYOUT = ("ROOT/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png and "
                     "ROOT/gtFine/<split>/<city>/<name>_gtFine_labelIds.png "
                     "(or _gtFine_labelTrainIds.png)")


def read_image(path: str) -> np.ndarray:
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB"))
  except Exception as e:
    raise UserError(f"cannot decode image {path} ({type(e).__name__}: {e})") from None


def read_label(path: str) -> np.ndarray:
  try:
    with Image.open(path) as im:
      label = np.asarray(im)
  except Exception as e:
    raise UserError(f"cannot decode label {path} ({type(e).__name__}: {e})") from None
  if label.ndim != 2:
    raise UserError(f"label {path} has shape {label.shape}; expected a single-channel "
                    "(H x W) PNG of class ids")
  return label


class CityscapesSource:
  """Cityscapes (fine annotations) in its official layout."""

  def __init__(self, root: str, split: str, skip_bad_files: bool = False):
    self.root, self.split, self.skip_bad_files = root, split, skip_bad_files
    if not root or not os.path.isdir(root):
      raise UserError(f"config.data.root={root!r} is not a directory; expected the Cityscapes "
                      f"layout {CITYSCAPES_LAYOUT}")
    image_dir = os.path.join(root, "leftImg8bit", split)
    if not os.path.isdir(image_dir):
      raise UserError(f"no split {split!r} under {root}: {image_dir} is missing; expected "
                      f"{CITYSCAPES_LAYOUT}")
    images = sorted(glob.glob(os.path.join(image_dir, "*", "*_leftImg8bit.png")))
    if not images:
      raise UserError(f"{image_dir} holds no */*_leftImg8bit.png; expected {CITYSCAPES_LAYOUT}")
    self.items = []
    for image in images:
      rel = os.path.relpath(image, image_dir)
      stem = rel[:-len("_leftImg8bit.png")]
      base = os.path.join(root, "gtFine", split, stem)
      train_ids, label_ids = base + "_gtFine_labelTrainIds.png", base + "_gtFine_labelIds.png"
      if os.path.exists(train_ids):
        self.items.append((image, train_ids, True, stem))
      elif os.path.exists(label_ids):
        self.items.append((image, label_ids, False, stem))
      else:
        raise UserError(f"image {image} has no label: expected {label_ids} (or {train_ids})")
    self._check_orphan_labels(images)
    self.bad_files = 0

  def _check_orphan_labels(self, images):
    label_dir = os.path.join(self.root, "gtFine", self.split)
    have = {os.path.relpath(p, os.path.join(self.root, "leftImg8bit", self.split))
            [:-len("_leftImg8bit.png")] for p in images}
    for label in glob.glob(os.path.join(label_dir, "*", "*_gtFine_labelIds.png")):
      stem = os.path.relpath(label, label_dir)[:-len("_gtFine_labelIds.png")]
      if stem not in have:
        raise UserError(f"label {label} has no image: expected "
                        f"{os.path.join(self.root, 'leftImg8bit', self.split, stem)}"
                        "_leftImg8bit.png")

  def __len__(self):
    return len(self.items)

  def __getitem__(self, index):
    image_path, label_path, is_train_ids, stem = self.items[index]
    try:
      image = read_image(image_path)
      label = read_label(label_path)
    except UserError as e:
      if not self.skip_bad_files:
        raise
      warnings.warn(f"skipping: {e}")
      self.bad_files += 1
      return self[(index + 1) % len(self)]
    if image.shape[:2] != label.shape:
      raise UserError(f"image {image_path} is {image.shape[1]}x{image.shape[0]} but its label "
                      f"{label_path} is {label.shape[1]}x{label.shape[0]}")
    if is_train_ids:
      bad = (label >= 19) & (label != IGNORE)
      if bad.any():
        raise UserError(f"label {label_path} holds train ids {sorted(set(label[bad].tolist()))[:5]}"
                        "; expected 0-18 or 255")
    else:
      if label.max() > 33:
        raise UserError(f"label {label_path} holds label ids up to {int(label.max())}; expected "
                        "Cityscapes label ids 0-33 (or use *_labelTrainIds.png)")
      label = CITYSCAPES_ID_TO_TRAIN[label]
    return {"image": image, "label": label.astype(np.uint8), "name": os.path.basename(stem)}


def generated_root(data_config) -> str:
  if data_config.get("root"):
    return os.path.expanduser(data_config.root)
  h, w = data_config.generated_size
  return os.path.expanduser(
      f"~/.cache/transkd_jax/generated-{data_config.num_train}-{data_config.num_val}-"
      f"{h}x{w}-seed{data_config.generated_seed}")


def make_source(data_config, split: str):
  """The random-access source of ``config.data`` for ``split``."""
  name = data_config.get("name", "generated")
  skip = bool(data_config.get("skip_bad_files", False))
  if name == "cityscapes":
    return CityscapesSource(os.path.expanduser(data_config.root), split, skip)
  if name == "generated":
    root = generated_root(data_config)
    try:
      generated.write_dataset(root, data_config.num_train, data_config.num_val,
                              tuple(data_config.generated_size), data_config.generated_seed)
    except ValueError as e:
      raise UserError(str(e)) from None
    return CityscapesSource(root, split, skip)
  raise UserError(f"config.data.name={name!r} is not available yet; expected one of "
                  "cityscapes, generated (acdc, nyuv2, voc and tfds are on the way)")
