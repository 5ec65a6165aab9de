"""A random-access source over a prepared TFDS dataset (array_record files).

Reads through ``tfds.data_source(...)``, which needs no TensorFlow: the dataset
must already be prepared under the data_dir in the array_record format (e.g.
``tfds build <name> --file_format=array_record``); nothing is downloaded.
Examples are the same as ``readers.PairedSource``'s:
``{"image": uint8 H x W x 3, "label": uint8 H x W train ids (255 ignored),
"name": str, "skipped": np.int32(0)}``.

``config.data`` keys:

- ``name``: "tfds".
- ``root``: the TFDS data_dir; empty means TFDS's default (``$TFDS_DATA_DIR``,
  else ``~/tensorflow_datasets``).
- ``tfds_name``: the dataset, ``name[/config][:version]``, e.g.
  "cityscapes/semantic_segmentation" or "my_dataset:1.0.0". Required.
- ``tfds_image_key`` ("image"): the image feature; uint8 H x W x 3 (grey
  H x W x 1 or H x W is repeated to 3 channels; encoded bytes are decoded).
- ``tfds_label_key`` ("segmentation_mask"): the label feature; H x W or
  H x W x 1 integer class values.
- ``tfds_name_key`` (""): a feature that names each example (e.g. "image_id");
  empty names examples ``<split>_<index>``.
- ``tfds_label_mapping`` ("train_ids"): how label values become train ids, as in
  ``labels.to_train_ids``: "train_ids" (classes or 255), "cityscapes_ids"
  (Cityscapes label ids 0-33, as TFDS's own cityscapes stores them) or "nyu40"
  (0 unlabelled -> 255, 1..40 -> 0..39).
- ``tfds_num_classes`` (0: the mapping's own, 19, or 40 with "nyu40"): the number of classes.

TFDS's Cityscapes (prepared from the manual download), for example::

  python -m transkd_jax.main --config.data.name=tfds \\
    --config.data.tfds_name=cityscapes/semantic_segmentation \\
    --config.data.root=~/tensorflow_datasets \\
    --config.data.tfds_label_mapping=cityscapes_ids \\
    --config.data.tfds_image_key=image_left \\
    --config.data.tfds_label_key=segmentation_label \\
    --config.data.tfds_name_key=image_id

The split may be any TFDS split string ("train", "validation", "train[:10%]").
"""

import io
import os

import numpy as np
from PIL import Image

from transkd_jax.data.labels import CITYSCAPES, MAPPINGS, NYUV2, ClassTable, to_train_ids
from transkd_jax.data.readers import check_key
from transkd_jax.errors import UserError

PREPARED_LAYOUT = (
  "<data_dir>/<name>/<config>/<version>/ with dataset_info.json, "
  "features.json and <name>-<split>.array_record-* files"
)


def _data_dir_text(data_dir: str) -> str:
  if data_dir:
    return repr(data_dir)
  # Optional and heavy: imported only when a tfds dataset is read.
  from tensorflow_datasets.core import constants  # pylint: disable=g-import-not-at-top

  return f"'' (TFDS's default, {constants.DATA_DIR})"


def open_tfds(name: str, data_dir: str, split: str):
  """``tfds.data_source`` for one split; a missing dataset or split is a ``UserError``."""
  # Optional and heavy: imported only when a tfds dataset is read.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  where = (
    f"config.data.tfds_name={name!r} split {split!r} under config.data.root="
    f"{_data_dir_text(data_dir)}"
  )
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
  except tfds.core.DatasetNotFoundError:
    raise UserError(
      f"no TFDS dataset {where}: neither a registered TFDS name nor prepared "
      f"there; expected {PREPARED_LAYOUT}"
    ) from None
  except (ValueError, NotImplementedError, AssertionError, OSError) as e:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if _is_prepared(tfds, name, data_dir) is False:  # TFDS's own error would be misleading
      raise UserError(
        f"TFDS dataset {where} is not prepared: expected {PREPARED_LAYOUT} "
        f"(e.g. `tfds build {name.split(':')[0]} --file_format=array_record"
        f"{' --data_dir ' + data_dir if data_dir else ''}`)"
      ) from None
    raise UserError(
      f"cannot read TFDS dataset {where} ({type(e).__name__}: {reason}); "
      "expected an existing split of a prepared array_record dataset"
    ) from None


def _is_prepared(tfds, name: str, data_dir: str):
  """Whether TFDS's builder for ``name`` finds its data; None when there is no builder."""
  try:
    return tfds.builder(name, data_dir=data_dir or None).is_prepared()
  except Exception:  # pylint: disable=broad-except
    return None


def to_image(value, where: str) -> np.ndarray:
  """A decoded (or encoded-bytes) image feature -> uint8 H x W x 3."""
  image = _decode(value, f"image {where}", "RGB")
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim == 2:
    image = np.stack([image] * 3, axis=-1)
  if image.ndim == 3 and image.shape[-1] == 4:
    image = image[..., :3]
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise UserError(
      f"image {where} is {image.dtype} with shape {image.shape}; expected uint8 "
      "H x W x 3 (or grey H x W x 1 / H x W)"
    )
  return image


def to_label(value, where: str) -> np.ndarray:
  """A decoded (or encoded-bytes) label feature -> integer H x W, values 0-255."""
  label = _decode(value, f"label {where}")
  if label.ndim == 3 and label.shape[-1] == 1:
    label = label[..., 0]
  if label.ndim != 2 or not np.issubdtype(label.dtype, np.integer):
    raise UserError(
      f"label {where} is {label.dtype} with shape {label.shape}; expected "
      "integer class values, H x W or H x W x 1"
    )
  bad = (label < 0) | (label > 255)
  if bad.any():
    raise UserError(
      f"label {where} holds values {sorted(set(label[bad].tolist()))[:5]}; "
      "expected class values 0-255"
    )
  return label


def _decode(value, where: str, mode=None) -> np.ndarray:
  """Encoded bytes (PNG, JPEG) -> an array, converted to ``mode`` when given."""
  if isinstance(value, (bytes, np.bytes_)):
    try:
      with Image.open(io.BytesIO(value)) as im:
        return np.asarray(im.convert(mode) if mode else im)
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f"cannot decode {where} ({type(e).__name__}: {e})") from None
  return np.asarray(value)


def to_name(value) -> str:
  value = value.item() if isinstance(value, np.ndarray) and value.ndim == 0 else value
  return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class TfdsSource:
  """A prepared TFDS split -> ``PairedSource``-style examples.

  Holds only config values when pickled; each process opens the TFDS data
  source on first use.
  """

  def __init__(self, name, data_dir, split, image_key, label_key, name_key, mapping, num_classes):
    self.tfds_name, self.data_dir, self.split = name, data_dir, split
    self.image_key, self.label_key, self.name_key = image_key, label_key, name_key
    self.mapping, self.num_classes = mapping, num_classes
    self._source = open_tfds(name, data_dir, split)
    self._length = len(self._source)
    keys = sorted(self._source.dataset_info.features.keys())
    for what, key in (("image", image_key), ("label", label_key), ("name", name_key)):
      if key and key not in keys:
        raise UserError(
          f"config.data.tfds_{what}_key={key!r} is not a feature of TFDS dataset "
          f"{name!r}; expected one of {', '.join(keys)}"
        )

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "_source"}

  def __setstate__(self, state):
    self.__dict__.update(state, _source=None)

  def __len__(self):
    return self._length

  def __getitem__(self, index):
    if self._source is None:
      self._source = open_tfds(self.tfds_name, self.data_dir, self.split)
    index = int(index)
    example = self._source[index]
    name = to_name(example[self.name_key]) if self.name_key else f"{self.split}_{index}"
    where = f"{self.tfds_name}[{self.split}] example {index} ({name})"
    image = to_image(example[self.image_key], where)
    label = to_label(example[self.label_key], where)
    if image.shape[:2] != label.shape:
      raise UserError(
        f"image {where} is {image.shape[1]}x{image.shape[0]} but its label is "
        f"{label.shape[1]}x{label.shape[0]}; expected the same size"
      )
    label = to_train_ids(label, self.mapping, self.num_classes, where)
    return {"image": image, "label": label.astype(np.uint8), "name": name, "skipped": np.int32(0)}


def check(data_config) -> None:
  """The ``tfds_*`` keys that need no file: the name is set, the mapping and class count valid."""
  if not data_config.tfds_name:
    raise UserError(
      "config.data.tfds_name is empty; expected a prepared TFDS dataset "
      "name[/config][:version], e.g. cityscapes/semantic_segmentation"
    )
  mapping = data_config.tfds_label_mapping
  if mapping not in MAPPINGS:
    raise UserError(
      f"config.data.tfds_label_mapping={mapping!r}; expected one of {', '.join(MAPPINGS)}"
    )
  count = data_config.tfds_num_classes
  check_key(
    isinstance(count, int) and not isinstance(count, bool) and count >= 0,
    "tfds_num_classes",
    "a non-negative integer (0: the mapping's own count)",
    count,
  )


def class_table(data_config) -> ClassTable:
  """Cityscapes' table with Cityscapes label ids, else ``class_i`` names of ``num_classes``."""
  if data_config.tfds_label_mapping == "cityscapes_ids":
    return CITYSCAPES
  default = NYUV2 if data_config.tfds_label_mapping == "nyu40" else CITYSCAPES
  return ClassTable.numbered(int(data_config.tfds_num_classes) or default.num_classes)


def class_count(data_config) -> int:
  """``config.data.tfds_num_classes``, or 0: the mapping's own (40 with nyu40, else 19)."""
  return int(data_config.tfds_num_classes) or class_table(data_config).num_classes


def tfds_source(data_config, split: str, num_classes: int = 0):
  """The ``TfdsSource`` of ``config.data`` (name "tfds") for ``split`` with ``num_classes``
  (0: ``class_count(data_config)``, the count the dataset table passes)."""
  check(data_config)
  return TfdsSource(
    data_config.tfds_name,
    os.path.expanduser(data_config.root),
    split,
    data_config.tfds_image_key,
    data_config.tfds_label_key,
    data_config.tfds_name_key,
    data_config.tfds_label_mapping,
    num_classes or class_count(data_config),
  )
