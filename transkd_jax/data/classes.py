"""Class tables per dataset: names and colours of ``config.data``'s dataset, from its row of
the dataset table (``datasets.DATASETS``), and the label values every module shares.

``IGNORE`` (255) is the project's one ignore label; it, the class tables and Cityscapes'
label-id mapping are defined in ``labels.py`` (below the sources, which need them) and
are the same objects here, where the rest of the project imports them from.
"""

import numpy as np

from transkd_jax.data.datasets import DATASETS
from transkd_jax.data.labels import (
  CITYSCAPES,
  CITYSCAPES_CLASS_WEIGHTS,
  CITYSCAPES_ID_TO_TRAIN,
  CITYSCAPES_NAMES,
  CITYSCAPES_PALETTE,
  CITYSCAPES_TRAIN_TO_ID,
  IGNORE,
  NYUV2,
  NYUV2_NAMES,
  NYUV2_PALETTE,
  VOC,
  VOC_NAMES,
  VOC_PALETTE,
  ClassTable,
  bit_palette,
)

# Views of the table, by dataset, for the rows with a fixed class table (tfds' follows its
# config: ``class_table``).
CLASS_NAMES = {
  name: row.classes.names for name, row in DATASETS.items() if isinstance(row.classes, ClassTable)
}
PALETTES = {
  name: row.classes.palette for name, row in DATASETS.items() if isinstance(row.classes, ClassTable)
}


def class_table(data_config):
  """The ``ClassTable`` of ``config.data``'s dataset; None for a name the table lacks."""
  row = DATASETS.get(data_config.name)
  return None if row is None else row.class_table(data_config)


def class_names(data_config, num_classes: int):
  """The dataset's class names, or ``class_0``.. when it has no table of that size."""
  table = class_table(data_config)
  if table is not None and table.num_classes == num_classes:
    return table.names
  return ClassTable.numbered(num_classes).names


def palette(data_config, num_classes: int) -> np.ndarray:
  """num_classes x 3 uint8 colours: the dataset's palette, else the VOC-style bit map."""
  table = class_table(data_config)
  if table is not None and len(table.palette) == num_classes:
    return table.palette
  return ClassTable.numbered(num_classes).palette


def colorize(ids: np.ndarray, colours: np.ndarray) -> np.ndarray:
  """Class ids -> RGB colours (``colours``: num_classes x 3 uint8, e.g. ``palette``)."""
  return colours[ids]


def overlay(image: np.ndarray, colour: np.ndarray, alpha: float) -> np.ndarray:
  """``colour`` blended over ``image`` (both H x W x 3 uint8) with weight ``alpha``."""
  blend = (1.0 - alpha) * image.astype(np.float32) + alpha * colour.astype(np.float32)
  return np.clip(np.rint(blend), 0, 255).astype(np.uint8)


__all__ = [
  "CITYSCAPES",
  "CITYSCAPES_CLASS_WEIGHTS",
  "CITYSCAPES_ID_TO_TRAIN",
  "CITYSCAPES_NAMES",
  "CITYSCAPES_PALETTE",
  "CITYSCAPES_TRAIN_TO_ID",
  "CLASS_NAMES",
  "IGNORE",
  "NYUV2",
  "NYUV2_NAMES",
  "NYUV2_PALETTE",
  "PALETTES",
  "VOC",
  "VOC_NAMES",
  "VOC_PALETTE",
  "ClassTable",
  "bit_palette",
  "class_names",
  "class_table",
  "colorize",
  "overlay",
  "palette",
]
