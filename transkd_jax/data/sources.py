"""The file-layout datasets: their expected layouts, file listings and source builders.

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
- ``generated``: the street-scene generator's tree (written on first use under
  ``config.data.root``, default ``~/.cache/transkd_jax/generated-...``), read
  through the Cityscapes source. It is written on a local disk: a URI root is
  refused (a copy of the tree in a bucket reads as ``cityscapes``).

``config.data.root`` of the four file layouts may be a URI (``gs://...``, any
``etils.epath`` one): each directory is listed once (``transkd_jax.storage``),
so which files exist is known without a request per file, and paths stay URIs.

Each ``<dataset>_source(data_config, split, num_classes)`` is the builder of a row of
the dataset table (``datasets.py``; ``tfds`` is ``tfds_source.py``'s), which passes the
row's class count; ``check_<dataset>`` checks the row's own keys without touching files.
"""

import os

from transkd_jax import storage
from transkd_jax.data import generated
from transkd_jax.data.labels import to_train_ids as to_train_ids  # (its home before labels.py)
from transkd_jax.data.readers import (
  PairedSource,
  check_key,
  need_dir,
  pair_files,
  read_split_list,
  stems_under,
)
from transkd_jax.data.readers import read_image as read_image  # sources.read_image: predict.py's
from transkd_jax.data.readers import read_label as read_label
from transkd_jax.errors import UserError

CITYSCAPES_LAYOUT = (
  "ROOT/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png and "
  "ROOT/gtFine/<split>/<city>/<name>_gtFine_labelIds.png "
  "(or _gtFine_labelTrainIds.png)"
)


def cityscapes_items(root: str, split: str):
  """(image, label, mapping, name) for Cityscapes' fine annotations."""
  need_dir(root, "config.data.root", CITYSCAPES_LAYOUT)
  image_dir = os.path.join(root, "leftImg8bit", split)
  if not storage.isdir(image_dir):
    raise UserError(
      f"no split {split!r} under {root}: {image_dir} is missing; expected {CITYSCAPES_LAYOUT}"
    )
  images = storage.glob(os.path.join(image_dir, "*", "*_leftImg8bit.png"))
  if not images:
    raise UserError(f"{image_dir} holds no */*_leftImg8bit.png; expected {CITYSCAPES_LAYOUT}")
  label_dir = os.path.join(root, "gtFine", split)
  return pair_files(
    images,
    image_dir,
    "_leftImg8bit.png",
    label_dir,
    [("_gtFine_labelTrainIds.png", "train_ids"), ("_gtFine_labelIds.png", "cityscapes_ids")],
  )


ACDC_CONDITIONS = ("fog", "night", "rain", "snow")
ACDC_LAYOUT = (
  "ROOT/rgb_anon/<condition>/<split>/<sequence>/<name>_rgb_anon.png and "
  "ROOT/gt/<condition>/<split>/<sequence>/<name>_gt_labelTrainIds.png "
  "(or _gt_labelIds.png)"
)


def acdc_conditions(conditions="all") -> tuple:
  """``config.data.conditions`` ("all", "" or a comma list; or a sequence) -> the conditions."""
  if conditions in ("all", "", None):
    return ACDC_CONDITIONS
  if isinstance(conditions, str):
    conditions = tuple(c.strip() for c in conditions.split(","))
  unknown = set(conditions) - set(ACDC_CONDITIONS)
  if unknown:
    raise UserError(
      f"config.data.conditions: unknown ACDC condition(s) {sorted(unknown)}; "
      f"expected some of {', '.join(ACDC_CONDITIONS)} or 'all'"
    )
  return conditions


def acdc_items(root: str, split: str, conditions="all"):
  """(image, label, mapping, name) for ACDC, over the selected weather conditions."""
  need_dir(root, "config.data.root", ACDC_LAYOUT)
  items = []
  for condition in acdc_conditions(conditions):
    image_dir = os.path.join(root, "rgb_anon", condition, split)
    if not storage.isdir(image_dir):
      raise UserError(
        f"no split {split!r} for condition {condition!r}: {image_dir} is "
        f"missing; expected {ACDC_LAYOUT}"
      )
    images = storage.glob(os.path.join(image_dir, "*", "*_rgb_anon.png"))
    items += pair_files(
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
  listing = os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt")
  names = [line.split()[0] for line in read_split_list(root, listing, split, VOC_LAYOUT)]
  label_dirs = [
    d for d in ("SegmentationClassAug", "SegmentationClass") if storage.isdir(os.path.join(root, d))
  ]
  if not label_dirs:
    raise UserError(
      f"{root} has neither SegmentationClassAug/ nor SegmentationClass/; expected {VOC_LAYOUT}"
    )
  jpegs = stems_under(os.path.join(root, "JPEGImages"), [".jpg"])[".jpg"]
  pngs = [stems_under(os.path.join(root, d), [".png"])[".png"] for d in label_dirs]
  items = []
  for name in names:
    image = os.path.join(root, "JPEGImages", name + ".jpg")
    labels = [os.path.join(root, d, name + ".png") for d in label_dirs]
    key = os.path.normpath(name)
    label = next((p for p, found in zip(labels, pngs) if key in found), None)
    if key not in jpegs:
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
  listing = os.path.join(root, f"{split}.txt")
  names = read_split_list(root, listing, split, NYUV2_LAYOUT)
  label_dir = os.path.join(root, "labels40")
  if not storage.isdir(label_dir):
    raise UserError(f"{label_dir} is missing; expected {NYUV2_LAYOUT}")
  found = stems_under(os.path.join(root, "images"), [".jpg", ".png"])
  labels = stems_under(label_dir, [".png"])[".png"]
  items = []
  for name in sorted(names):
    images = [os.path.join(root, "images", name + ext) for ext in (".jpg", ".png")]
    key = os.path.normpath(name)
    image = next((p for p, ext in zip(images, (".jpg", ".png")) if key in found[ext]), None)
    label = os.path.join(label_dir, name + ".png")
    if image is None:
      raise UserError(f"{listing} lists {name!r} but {images[0]} is missing")
    if key not in labels:
      raise UserError(f"image {image} has no label: expected {label}")
    items.append((image, label, "nyu40", name))
  if not items:
    raise UserError(f"{listing} lists no images; expected {NYUV2_LAYOUT}")
  return items


def generated_root(data_config) -> str:
  """Where the generated tree is written: a local directory (a URI root is refused)."""
  _check_generated_root(data_config.root)
  if data_config.root:
    return os.path.expanduser(data_config.root)
  h, w = data_config.generated_size
  return os.path.expanduser(
    f"~/.cache/transkd_jax/generated-{data_config.num_train}-{data_config.num_val}-"
    f"{h}x{w}-seed{data_config.generated_seed}"
  )


# --- the builders and key checks of the dataset table's rows ------------------------------------


def _root(data_config) -> str:
  return os.path.expanduser(data_config.root)


def _paired(data_config, items, num_classes: int) -> PairedSource:
  return PairedSource(items, num_classes, bool(data_config.skip_bad_files))


def cityscapes_source(data_config, split: str, num_classes: int):
  return _paired(data_config, cityscapes_items(_root(data_config), split), num_classes)


def acdc_source(data_config, split: str, num_classes: int):
  items = acdc_items(_root(data_config), split, data_config.conditions)
  return _paired(data_config, items, num_classes)


def check_acdc(data_config) -> None:
  acdc_conditions(data_config.conditions)


def voc_source(data_config, split: str, num_classes: int):
  return _paired(data_config, voc_items(_root(data_config), split), num_classes)


def nyuv2_source(data_config, split: str, num_classes: int):
  return _paired(data_config, nyuv2_items(_root(data_config), split), num_classes)


def generated_source(data_config, split: str, num_classes: int):
  """The generated tree (written on first use) read as Cityscapes."""
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
  return _paired(data_config, cityscapes_items(root, split), num_classes)


def _count(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_generated_root(root) -> None:
  check_key(
    not storage.is_uri(root),
    "root",
    "a local directory for name='generated' (the tree is written there; a copy of it in a "
    "bucket reads as name='cityscapes')",
    root,
  )


def check_generated(data_config) -> None:
  _check_generated_root(data_config.root)
  for key in ("num_train", "num_val", "generated_seed"):
    check_key(_count(data_config[key]), key, "a non-negative integer", data_config[key])
  size = tuple(data_config.generated_size)
  check_key(
    len(size) == 2 and all(_count(s) and s > 0 for s in size),
    "generated_size",
    "(height, width), each a positive integer",
    size,
  )
