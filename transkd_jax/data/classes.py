"""Class tables per dataset: names, colours, and Cityscapes' label-id mapping.

Cityscapes' mapping comes from cityscapesScripts' own label table
(``cityscapesscripts.helpers.labels``), so our train ids are the benchmark's.
"""

import numpy as np
from cityscapesscripts.helpers.labels import labels as _CITYSCAPES_LABELS

IGNORE = 255

_TRAIN = sorted(
  (lab for lab in _CITYSCAPES_LABELS if 0 <= lab.trainId < 255), key=lambda lab: lab.trainId
)
CITYSCAPES_NAMES = tuple(lab.name for lab in _TRAIN)
CITYSCAPES_PALETTE = np.array([lab.color for lab in _TRAIN], np.uint8)


def _cityscapes_lut() -> np.ndarray:
  lut = np.full(256, IGNORE, np.uint8)
  for label in _CITYSCAPES_LABELS:
    if 0 <= label.id < 256:
      lut[label.id] = label.trainId if 0 <= label.trainId < 255 else IGNORE
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


def _voc_palette(n=21):
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


VOC_PALETTE = _voc_palette()

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
NYUV2_PALETTE = _voc_palette(41)[1:]

CLASS_NAMES = {
  "cityscapes": CITYSCAPES_NAMES,
  "acdc": CITYSCAPES_NAMES,
  "generated": CITYSCAPES_NAMES,
  "voc": VOC_NAMES,
  "nyuv2": NYUV2_NAMES,
}
PALETTES = {
  "cityscapes": CITYSCAPES_PALETTE,
  "acdc": CITYSCAPES_PALETTE,
  "generated": CITYSCAPES_PALETTE,
  "voc": VOC_PALETTE,
  "nyuv2": NYUV2_PALETTE,
}


def _dataset_key(data_config) -> str:
  name = data_config.name
  if name == "tfds" and data_config.tfds_label_mapping == "cityscapes_ids":
    return "cityscapes"
  return name


def class_names(data_config, num_classes: int):
  """The dataset's class names, or ``class_0``.. when it has no table of that size."""
  names = CLASS_NAMES.get(_dataset_key(data_config))
  if names is not None and len(names) == num_classes:
    return names
  return tuple(f"class_{i}" for i in range(num_classes))


def palette(data_config, num_classes: int) -> np.ndarray:
  """num_classes x 3 uint8 colours: the dataset's palette, else the VOC-style bit map."""
  colours = PALETTES.get(_dataset_key(data_config))
  if colours is not None and len(colours) == num_classes:
    return colours
  return _voc_palette(num_classes + 1)[1:]
