"""Label values and class tables, below every source: the ignore label, each class
table (names, palette, hence class count), Cityscapes' label-id mapping, and
``to_train_ids``, which turns a label file's values into train ids.

Cityscapes' mapping comes from cityscapesScripts' own label table
(``cityscapesscripts.helpers.labels``), so our train ids are the benchmark's.
Which dataset uses which table is the dataset table's business (``datasets.py``);
``classes.py`` answers per dataset.
"""

import dataclasses

import numpy as np
from cityscapesscripts.helpers.labels import labels as _CITYSCAPES_LABELS

from transkd_jax.errors import UserError

IGNORE = 255


def _has_train_id(label) -> bool:
  return 0 <= label.trainId < IGNORE  # cityscapesScripts marks "no train id" 255 (or -1)


_TRAIN = sorted(
  (lab for lab in _CITYSCAPES_LABELS if _has_train_id(lab)), key=lambda lab: lab.trainId
)
CITYSCAPES_NAMES = tuple(lab.name for lab in _TRAIN)
CITYSCAPES_PALETTE = np.array([lab.color for lab in _TRAIN], np.uint8)


def _cityscapes_lut() -> np.ndarray:
  lut = np.full(256, IGNORE, np.uint8)
  for label in _CITYSCAPES_LABELS:
    if 0 <= label.id < 256:
      lut[label.id] = label.trainId if _has_train_id(label) else IGNORE
  return lut


# labelIds (0..33) -> train ids (0..18, 255 ignored).
CITYSCAPES_ID_TO_TRAIN = _cityscapes_lut()
# train ids -> labelIds (for the generator and the submission format).
CITYSCAPES_TRAIN_TO_ID = np.array([lab.id for lab in _TRAIN], np.uint8)

# The public TransKD code's ENet-style cross-entropy weights for the 19 Cityscapes train ids
# (it uses them for Cityscapes and ACDC).
CITYSCAPES_CLASS_WEIGHTS = (
  2.5959737,
  6.741505,
  3.5353868,
  9.866315,
  9.690922,
  9.369371,
  10.289124,
  9.953209,
  4.3098087,
  9.490392,
  7.674411,
  9.396925,
  10.347794,
  6.3928986,
  10.226673,
  10.241072,
  10.28059,
  10.396977,
  10.05567,
)

VOC_NAMES = (
  "background",
  "aeroplane",
  "bicycle",
  "bird",
  "boat",
  "bottle",
  "bus",
  "car",
  "cat",
  "chair",
  "cow",
  "diningtable",
  "dog",
  "horse",
  "motorbike",
  "person",
  "pottedplant",
  "sheep",
  "sofa",
  "train",
  "tvmonitor",
)


def bit_palette(n=21):
  """The bit-interleaved colour map of VOC's devkit (``n`` x 3 uint8): colour i spreads the
  bits of i over the high bits of r, g and b."""
  palette = np.zeros((n, 3), np.uint8)
  for i in range(n):
    c, r, g, b = i, 0, 0, 0
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    palette[i] = (r, g, b)
  return palette


VOC_PALETTE = bit_palette()

# NYUv2's 40 classes (Gupta et al. 2013), train ids 0-39 = label values 1-40.
NYUV2_NAMES = (
  "wall",
  "floor",
  "cabinet",
  "bed",
  "chair",
  "sofa",
  "table",
  "door",
  "window",
  "bookshelf",
  "picture",
  "counter",
  "blinds",
  "desk",
  "shelves",
  "curtain",
  "dresser",
  "pillow",
  "mirror",
  "floor mat",
  "clothes",
  "ceiling",
  "books",
  "refrigerator",
  "television",
  "paper",
  "towel",
  "shower curtain",
  "box",
  "whiteboard",
  "person",
  "night stand",
  "toilet",
  "sink",
  "lamp",
  "bathtub",
  "bag",
  "otherstructure",
  "otherfurniture",
  "otherprop",
)
# The bit-interleaved colour map (as VOC's) indexed by the raw 1-40 label value, as NYUv2
# toolkits colour the labels40 PNGs (the public code indexes it by train id, painting walls black).
NYUV2_PALETTE = bit_palette(41)[1:]


@dataclasses.dataclass(frozen=True, eq=False)
class ClassTable:
  """A dataset's classes: ``names`` (train id order) and ``palette`` (len(names) x 3 uint8)."""

  names: tuple
  palette: np.ndarray

  @property
  def num_classes(self) -> int:
    return len(self.names)

  @classmethod
  def numbered(cls, num_classes: int) -> "ClassTable":
    """``class_0``.. with the bit colour map (skipping its black): classes without a table."""
    return cls(tuple(f"class_{i}" for i in range(num_classes)), bit_palette(num_classes + 1)[1:])


CITYSCAPES = ClassTable(CITYSCAPES_NAMES, CITYSCAPES_PALETTE)
VOC = ClassTable(VOC_NAMES, VOC_PALETTE)
NYUV2 = ClassTable(NYUV2_NAMES, NYUV2_PALETTE)

# How label values become train ids (``to_train_ids``).
MAPPINGS = ("train_ids", "classes", "cityscapes_ids", "nyu40")


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
