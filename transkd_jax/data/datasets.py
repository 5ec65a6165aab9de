"""The dataset table: one row per dataset, and what reads it.

A row (``Dataset``) carries the dataset's source builder, its class table (names,
palette, hence class count) and the file layout it expects (the text errors quote).
``DATASETS`` is the only list of datasets: ``make_source``, ``classes.class_names`` /
``classes.palette`` and ``check_config`` (the start-up check of ``config.data``) read it.

    from transkd_jax.data.datasets import DATASETS, check_config, make_source
    DATASETS["voc"].classes.num_classes        # 21
    DATASETS["tfds"].class_table(data_config)  # a row whose classes the config sets
    DATASETS["folder"].class_table(data_config)  # read from config.data.folder_classes
"""

import dataclasses
from typing import Callable, Optional, Union

from transkd_jax.data import folder, sources, tfds_source, transforms
from transkd_jax.data.labels import CITYSCAPES, NYUV2, VOC, ClassTable
from transkd_jax.data.readers import check_key
from transkd_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Dataset:
  """One dataset.

  ``build(data_config, split, num_classes)``: its random-access source (examples
  ``{"image", "label", "name", "skipped"}``). ``classes``: its ``ClassTable``, or
  ``fn(data_config) -> ClassTable`` where the config chooses (tfds; folder: its class
  file). ``layout``: the layout it expects on disk. ``check(data_config)``: its own keys,
  without touching files (None: it has none). ``count(data_config)``: its class count
  where the config sets one apart from the table (tfds' ``tfds_num_classes``; None: the
  table's). ``own_classes``: the dataset defines its classes (folder: its class file), so
  ``config.num_classes`` must be their count.
  """

  name: str
  build: Callable
  classes: Union[ClassTable, Callable]
  layout: str
  check: Optional[Callable] = None
  count: Optional[Callable] = None
  own_classes: bool = False

  def class_table(self, data_config) -> ClassTable:
    return self.classes(data_config) if callable(self.classes) else self.classes

  def num_classes(self, data_config) -> int:
    """The class count the source checks labels against."""
    if self.count is not None:
      return self.count(data_config)
    return self.class_table(data_config).num_classes


DATASETS = {
  row.name: row
  for row in (
    Dataset("cityscapes", sources.cityscapes_source, CITYSCAPES, sources.CITYSCAPES_LAYOUT),
    Dataset("acdc", sources.acdc_source, CITYSCAPES, sources.ACDC_LAYOUT, check=sources.check_acdc),
    Dataset("nyuv2", sources.nyuv2_source, NYUV2, sources.NYUV2_LAYOUT),
    Dataset("voc", sources.voc_source, VOC, sources.VOC_LAYOUT),
    Dataset(
      "tfds",
      tfds_source.tfds_source,
      tfds_source.class_table,
      tfds_source.PREPARED_LAYOUT,
      check=tfds_source.check,
      count=tfds_source.class_count,
    ),
    # The generator's tree, in Cityscapes' layout, read by the Cityscapes reader.
    Dataset(
      "generated",
      sources.generated_source,
      CITYSCAPES,
      sources.CITYSCAPES_LAYOUT,
      check=sources.check_generated,
    ),
    # Your own images and masks, paired by stem; classes from its class file (folder.py).
    Dataset(
      "folder",
      folder.folder_source,
      folder.class_table,
      folder.LAYOUT,
      check=folder.check,
      own_classes=True,
    ),
  )
}


def get_dataset(name: str) -> Dataset:
  """The row ``config.data.name`` names; a ``UserError`` listing the rows if there is none."""
  if name not in DATASETS:
    raise UserError(
      f"config.data.name={name!r} is not known; expected one of {', '.join(DATASETS)}"
    )
  return DATASETS[name]


def make_source(data_config, split: str, num_classes: Optional[int] = None):
  """The random-access source of ``config.data`` for ``split``. ``num_classes``
  (``config.num_classes``) is checked against a dataset that defines its own classes."""
  row = get_dataset(data_config.name)
  count = row.num_classes(data_config)
  if row.own_classes and num_classes is not None and num_classes != count:
    raise UserError(
      f"config.num_classes={num_classes}, but the {row.name} dataset's classes "
      f"({folder.classes_path(data_config)}) are {count}: set --config.num_classes={count}"
    )
  return row.build(data_config, split, count)


def _count(value, allow_zero: bool = True) -> bool:
  return (
    isinstance(value, int) and not isinstance(value, bool) and value >= (0 if allow_zero else 1)
  )


def check_config(data_config) -> None:
  """Checks ``config.data`` at start-up, touching no file; a ``UserError`` names the key
  (``config.data.<key>``), its value and what was expected.

  The dataset name, the transform keys (``transforms.check_keys``: transforms,
  eval_label_resolution, ``mmseg_*``), reading (num_workers, prefetch, eval_label_pad)
  and the dataset's own keys (its row's ``check``: ACDC's conditions, the ``tfds_*``
  keys, the generated dataset's sizes, the ``folder_*`` keys).
  """
  name = data_config.name
  check_key(name in DATASETS, "name", f"one of {tuple(DATASETS)}", name)
  transforms.check_keys(data_config)
  workers = data_config.num_workers
  check_key(
    workers == "auto" or _count(workers), "num_workers", "a non-negative integer or 'auto'", workers
  )
  check_key(
    _count(data_config.prefetch, allow_zero=False),
    "prefetch",
    "a positive integer",
    data_config.prefetch,
  )
  pad = tuple(data_config.eval_label_pad)
  check_key(
    len(pad) == 2 and all(_count(v) for v in pad),
    "eval_label_pad",
    "(height, width), non-negative integers ((0, 0): the first label's size)",
    pad,
  )
  row = DATASETS[name]
  if row.check is not None:
    row.check(data_config)
