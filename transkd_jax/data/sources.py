"""Random-access sources over datasets in their official layouts.

Every source has ``len()`` and ``[i]`` returning
``{"image": uint8 H x W x 3, "label": uint8 H x W train ids (255 ignored), "name": str}``,
which is what ``grain.MapDataset.source`` needs.

- ``cityscapes``: ``ROOT/leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with
  ``ROOT/gtFine/<split>/<city>/*_gtFine_labelTrainIds.png`` when present, else
  ``*_gtFine_labelIds.png`` mapped with cityscapesScripts' label table.
- ``acdc``: ``ROOT/rgb_anon/<condition>/<split>/<seq>/*_rgb_anon.png`` with
  ``ROOT/gt/<condition>/<split>/<seq>/*_gt_labelTrainIds.png`` (or labelIds);
  ``config.data.conditions``: "all" or a comma list of fog, night, rain, snow.
- ``voc``: Pascal VOC 2012 with SBD's augmented labels: ``JPEGImages/*.jpg``,
  ``SegmentationClassAug/*.png`` (else ``SegmentationClass/``), split lists in
  ``ImageSets/Segmentation/<split>.txt``; 21 classes, 255 ignored.
- ``nyuv2``: NYUv2 with 40 classes as the public TransKD code reads it:
  ``images/<name>.jpg``, ``labels40/<name>.png`` (0 unlabelled -> 255, 1-40 ->
  0-39), split lists ``<split>.txt`` (train.txt 795, test.txt 654 names).
- ``tfds``: any prepared TFDS dataset, read with ``tfds.data_source``
  (``tfds_source.py`` lists its ``config.data.tfds_*`` keys).
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

CITYSCAPES_LAYOUT = (
  "ROOT/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png and "
  "ROOT/gtFine/<split>/<city>/<name>_gtFine_labelIds.png "
  "(or _gtFine_labelTrainIds.png)"
)


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
    raise UserError(
      f"label {path} has shape {label.shape}; expected a single-channel (H x W) PNG of class ids"
    )
  return label


def to_train_ids(label: np.ndarray, mapping: str, num_classes: int, where: str) -> np.ndarray:
  """Label values -> train ids (255 ignored); ``where`` names the file in errors.

  ``mapping``: "train_ids" / "classes" (values are classes or 255),
  "cityscapes_ids" (Cityscapes label ids 0-33, mapped with cityscapesScripts'
  table) or "nyu40" (0 unlabelled -> 255, 1..40 -> 0..39, as the public code's
  ``label - 1``).
  """
  if mapping == "cityscapes_ids":
    if label.max() > 33:
      raise UserError(
        f"label {where} holds label ids up to {int(label.max())}; expected "
        "Cityscapes label ids 0-33 (or use *_labelTrainIds.png)"
      )
    return CITYSCAPES_ID_TO_TRAIN[label]
  if mapping == "nyu40":
    if label.max() > num_classes:
      bad = sorted(set(label[label > num_classes].tolist()))[:5]
      raise UserError(
        f"label {where} holds values {bad}; expected 0 (unlabelled) or the "
        f"40-class ids 1-{num_classes}"
      )
    return (label.astype(np.int32) - 1).astype(np.uint8)  # 0 wraps to 255
  if mapping not in ("train_ids", "classes"):
    raise ValueError(f"unknown label mapping {mapping!r}")
  bad = (label >= num_classes) & (label != IGNORE)
  if bad.any():
    raise UserError(
      f"label {where} holds values {sorted(set(label[bad].tolist()))[:5]}; "
      f"expected classes 0-{num_classes - 1} or {IGNORE}"
    )
  return label


class PairedSource:
  """Image/label file pairs -> examples; the label mapping decides the train ids.

  ``items``: (image path, label path, mapping, name), mapping as in
  ``to_train_ids``. With ``skip_bad_files`` an undecodable pair is skipped with
  a warning (the next pair is returned instead) and every example carries
  ``skipped``: how many bad files were passed over to produce it, so the
  training loop can report a total even when workers do the reading.
  """

  def __init__(self, items, num_classes: int, skip_bad_files: bool = False):
    self.items, self.num_classes, self.skip_bad_files = items, num_classes, skip_bad_files

  def __len__(self):
    return len(self.items)

  def __getitem__(self, index):
    for skipped in range(len(self.items)):
      image_path, label_path, mapping, name = self.items[(index + skipped) % len(self.items)]
      try:
        image = read_image(image_path)
        label = read_label(label_path)
        break
      except UserError as e:
        if not self.skip_bad_files:
          raise
        warnings.warn(f"skipping a bad file (config.data.skip_bad_files=True): {e}", stacklevel=2)
    else:
      raise UserError(
        f"every one of the {len(self.items)} files of this split failed to "
        "decode (config.data.skip_bad_files=True skipped them all)"
      )
    if image.shape[:2] != label.shape:
      raise UserError(
        f"image {image_path} is {image.shape[1]}x{image.shape[0]} but its label "
        f"{label_path} is {label.shape[1]}x{label.shape[0]}"
      )
    label = to_train_ids(label, mapping, self.num_classes, label_path)
    return {
      "image": image,
      "label": label.astype(np.uint8),
      "name": name,
      "skipped": np.int32(skipped),
    }


def _need_dir(path, what, layout):
  if not path or not os.path.isdir(path):
    raise UserError(f"{what}: {path!r} is not a directory; expected the layout {layout}")


def cityscapes_items(root: str, split: str):
  """(image, label, mapping, name) for Cityscapes' fine annotations."""
  _need_dir(root, "config.data.root", CITYSCAPES_LAYOUT)
  image_dir = os.path.join(root, "leftImg8bit", split)
  if not os.path.isdir(image_dir):
    raise UserError(
      f"no split {split!r} under {root}: {image_dir} is missing; expected {CITYSCAPES_LAYOUT}"
    )
  images = sorted(glob.glob(os.path.join(image_dir, "*", "*_leftImg8bit.png")))
  if not images:
    raise UserError(f"{image_dir} holds no */*_leftImg8bit.png; expected {CITYSCAPES_LAYOUT}")
  label_dir = os.path.join(root, "gtFine", split)
  return _pair(
    images,
    image_dir,
    "_leftImg8bit.png",
    label_dir,
    [("_gtFine_labelTrainIds.png", "train_ids"), ("_gtFine_labelIds.png", "cityscapes_ids")],
  )


def _pair(images, image_dir, image_suffix, label_dir, label_kinds):
  """Matches every image with its label (first existing kind); names what is missing."""
  items, stems = [], set()
  for image in images:
    stem = os.path.relpath(image, image_dir)[: -len(image_suffix)]
    stems.add(stem)
    for suffix, mapping in label_kinds:
      label = os.path.join(label_dir, stem + suffix)
      if os.path.exists(label):
        items.append((image, label, mapping, os.path.basename(stem)))
        break
    else:
      expected = os.path.join(label_dir, stem + label_kinds[-1][0])
      raise UserError(
        f"image {image} has no label: expected {expected} (or "
        f"{' / '.join(s for s, _ in label_kinds[:-1])})"
      )
  for suffix, _ in label_kinds:
    for label in glob.glob(os.path.join(label_dir, "**", "*" + suffix), recursive=True):
      stem = os.path.relpath(label, label_dir)[: -len(suffix)]
      if stem not in stems:
        raise UserError(
          f"label {label} has no image: expected {os.path.join(image_dir, stem + image_suffix)}"
        )
  return items


ACDC_CONDITIONS = ("fog", "night", "rain", "snow")
ACDC_LAYOUT = (
  "ROOT/rgb_anon/<condition>/<split>/<sequence>/<name>_rgb_anon.png and "
  "ROOT/gt/<condition>/<split>/<sequence>/<name>_gt_labelTrainIds.png "
  "(or _gt_labelIds.png)"
)


def acdc_items(root: str, split: str, conditions="all"):
  """(image, label, mapping, name) for ACDC, over the selected weather conditions."""
  _need_dir(root, "config.data.root", ACDC_LAYOUT)
  if conditions in ("all", "", None):
    conditions = ACDC_CONDITIONS
  elif isinstance(conditions, str):
    conditions = tuple(c.strip() for c in conditions.split(","))
  unknown = set(conditions) - set(ACDC_CONDITIONS)
  if unknown:
    raise UserError(
      f"config.data.conditions: unknown ACDC condition(s) {sorted(unknown)}; "
      f"expected some of {', '.join(ACDC_CONDITIONS)} or 'all'"
    )
  items = []
  for condition in conditions:
    image_dir = os.path.join(root, "rgb_anon", condition, split)
    if not os.path.isdir(image_dir):
      raise UserError(
        f"no split {split!r} for condition {condition!r}: {image_dir} is "
        f"missing; expected {ACDC_LAYOUT}"
      )
    images = sorted(glob.glob(os.path.join(image_dir, "*", "*_rgb_anon.png")))
    items += _pair(
      images,
      image_dir,
      "_rgb_anon.png",
      os.path.join(root, "gt", condition, split),
      [("_gt_labelTrainIds.png", "train_ids"), ("_gt_labelIds.png", "cityscapes_ids")],
    )
  if not items:
    raise UserError(f"no ACDC images for split {split!r} under {root}; expected {ACDC_LAYOUT}")
  return items


VOC_LAYOUT = (
  "ROOT/JPEGImages/<name>.jpg, ROOT/SegmentationClassAug/<name>.png (or "
  "SegmentationClass/), ROOT/ImageSets/Segmentation/<split>.txt "
  "(e.g. train_aug.txt, train.txt, val.txt)"
)


def voc_items(root: str, split: str):
  """(image, label, mapping, name) for Pascal VOC 2012 (+ SBD's SegmentationClassAug)."""
  _need_dir(root, "config.data.root", VOC_LAYOUT)
  listing = os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt")
  if not os.path.exists(listing):
    raise UserError(f"no split {split!r}: {listing} is missing; expected {VOC_LAYOUT}")
  with open(listing) as f:
    names = [line.split()[0] for line in f if line.strip()]
  label_dirs = [
    d for d in ("SegmentationClassAug", "SegmentationClass") if os.path.isdir(os.path.join(root, d))
  ]
  if not label_dirs:
    raise UserError(
      f"{root} has neither SegmentationClassAug/ nor SegmentationClass/; expected {VOC_LAYOUT}"
    )
  items = []
  for name in names:
    image = os.path.join(root, "JPEGImages", name + ".jpg")
    labels = [os.path.join(root, d, name + ".png") for d in label_dirs]
    label = next((p for p in labels if os.path.exists(p)), None)
    if not os.path.exists(image):
      raise UserError(f"{listing} lists {name!r} but {image} is missing")
    if label is None:
      raise UserError(f"image {image} has no label: expected {labels[0]}")
    items.append((image, label, "classes", name))
  return items


NYUV2_LAYOUT = (
  "ROOT/images/<name>.jpg (or .png), ROOT/labels40/<name>.png (0 unlabelled, "
  "1-40 the 40 classes), ROOT/<split>.txt listing one <name> per line "
  "(train.txt, test.txt)"
)


def nyuv2_items(root: str, split: str):
  """(image, label, mapping, name) for NYUv2 with 40 classes, the public TransKD layout."""
  _need_dir(root, "config.data.root", NYUV2_LAYOUT)
  listing = os.path.join(root, f"{split}.txt")
  if not os.path.exists(listing):
    raise UserError(f"no split {split!r}: {listing} is missing; expected {NYUV2_LAYOUT}")
  label_dir = os.path.join(root, "labels40")
  if not os.path.isdir(label_dir):
    raise UserError(f"{label_dir} is missing; expected {NYUV2_LAYOUT}")
  with open(listing) as f:
    names = [line.strip() for line in f if line.strip()]
  items = []
  for name in sorted(names):
    images = [os.path.join(root, "images", name + ext) for ext in (".jpg", ".png")]
    image = next((p for p in images if os.path.exists(p)), None)
    label = os.path.join(label_dir, name + ".png")
    if image is None:
      raise UserError(f"{listing} lists {name!r} but {images[0]} is missing")
    if not os.path.exists(label):
      raise UserError(f"image {image} has no label: expected {label}")
    items.append((image, label, "nyu40", name))
  if not items:
    raise UserError(f"{listing} lists no images; expected {NYUV2_LAYOUT}")
  return items


def generated_root(data_config) -> str:
  if data_config.root:
    return os.path.expanduser(data_config.root)
  h, w = data_config.generated_size
  return os.path.expanduser(
    f"~/.cache/transkd_jax/generated-{data_config.num_train}-{data_config.num_val}-"
    f"{h}x{w}-seed{data_config.generated_seed}"
  )


def make_source(data_config, split: str):
  """The random-access source of ``config.data`` for ``split``."""
  name = data_config.name
  skip = bool(data_config.skip_bad_files)
  root = os.path.expanduser(data_config.root)
  if name == "cityscapes":
    return PairedSource(cityscapes_items(root, split), 19, skip)
  if name == "acdc":
    return PairedSource(acdc_items(root, split, data_config.conditions), 19, skip)
  if name == "voc":
    return PairedSource(voc_items(root, split), 21, skip)
  if name == "nyuv2":
    return PairedSource(nyuv2_items(root, split), 40, skip)
  if name == "generated":
    root = generated_root(data_config)
    try:
      generated.write_dataset(
        root,
        data_config.num_train,
        data_config.num_val,
        tuple(data_config.generated_size),
        data_config.generated_seed,
      )
    except ValueError as e:
      raise UserError(str(e)) from None
    return PairedSource(cityscapes_items(root, split), 19, skip)
  if name == "tfds":
    from transkd_jax.data.tfds_source import tfds_source

    return tfds_source(data_config, split)
  raise UserError(
    f"config.data.name={name!r} is not known; expected one of "
    "cityscapes, acdc, nyuv2, voc, tfds, generated"
  )
