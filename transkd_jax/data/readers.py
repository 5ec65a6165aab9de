"""Reading files: images, labels, split listings, image/label pairing, and
``PairedSource``, the random-access source over (image, label) file pairs that
every file-layout dataset (``sources.py``) returns.

Paths are local paths or URIs (``gs://...``), listed and read through
``transkd_jax.storage``; a URI's files are read whole in one request each.
"""

import io
import os
import warnings

import numpy as np
from PIL import Image

from transkd_jax import storage
from transkd_jax.data.labels import to_train_ids
from transkd_jax.errors import UserError


def _image_file(path: str):
  """What PIL opens for ``path``: a local path as is, a URI's bytes (PIL seeks)."""
  return io.BytesIO(storage.read_bytes(path)) if storage.is_uri(path) else path


def read_image(path: str) -> np.ndarray:
  try:
    with Image.open(_image_file(path)) as im:
      return np.asarray(im.convert("RGB"))
  except Exception as e:
    raise UserError(f"cannot decode image {path} ({type(e).__name__}: {e})") from None


def read_label(path: str) -> np.ndarray:
  try:
    with Image.open(_image_file(path)) as im:
      label = np.asarray(im)
  except Exception as e:
    raise UserError(f"cannot decode label {path} ({type(e).__name__}: {e})") from None
  if label.ndim != 2:
    raise UserError(
      f"label {path} has shape {label.shape}; expected a single-channel (H x W) PNG of class ids"
    )
  return label


class PairedSource:
  """Image/label file pairs -> examples; the label mapping decides the train ids.

  ``items``: (image path, label path, mapping, name), mapping as in
  ``to_train_ids``, or a callable ``(label, label path) -> train ids`` (the folder
  dataset's class file). With ``skip_bad_files`` an undecodable pair is skipped with
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
    if callable(mapping):
      label = mapping(label, label_path)
    else:
      label = to_train_ids(label, mapping, self.num_classes, label_path)
    return {
      "image": image,
      "label": label.astype(np.uint8),
      "name": name,
      "skipped": np.int32(skipped),
    }


def need_dir(path, what, layout):
  if not path or not storage.isdir(path):
    raise UserError(f"{what}: {path!r} is not a directory; expected the layout {layout}")


def stems_under(directory: str, suffixes) -> dict:
  """{suffix: {stem: path}} of the files under ``directory`` (any depth) named
  ``<stem><suffix>``, stems relative to ``directory``: one listing of the tree, for
  testing which files exist without a request per file on an object store."""
  suffixes = tuple(suffixes)
  found = {suffix: {} for suffix in suffixes}
  for path in storage.files_under(directory, suffixes):
    rel = storage.relpath(path, directory)
    for suffix in suffixes:
      if rel.endswith(suffix):
        found[suffix][rel[: -len(suffix)]] = path
  return found


def pair_files(images, image_dir, image_suffix, label_dir, label_kinds):
  """Matches every image with its label (first existing kind); names what is missing."""
  labels = stems_under(label_dir, [s for s, _ in label_kinds])
  items, stems = [], set()
  for image in images:
    stem = storage.relpath(image, image_dir)[: -len(image_suffix)]
    stems.add(stem)
    for suffix, mapping in label_kinds:
      if stem in labels[suffix]:
        label = os.path.join(label_dir, stem + suffix)
        items.append((image, label, mapping, os.path.basename(stem)))
        break
    else:
      expected = os.path.join(label_dir, stem + label_kinds[-1][0])
      raise UserError(
        f"image {image} has no label: expected {expected} (or "
        f"{' / '.join(s for s, _ in label_kinds[:-1])})"
      )
  for suffix, _ in label_kinds:
    for stem, label in sorted(labels[suffix].items(), key=lambda kv: kv[1]):
      if stem not in stems:
        raise UserError(
          f"label {label} has no image: expected {os.path.join(image_dir, stem + image_suffix)}"
        )
  return items


def read_split_list(root: str, listing: str, split: str, layout: str) -> list:
  """The non-empty lines (stripped) of ``split``'s listing file ``listing`` (under ``root``)."""
  need_dir(root, "config.data.root", layout)
  if not storage.exists(listing):
    raise UserError(f"no split {split!r}: {listing} is missing; expected {layout}")
  return [line.strip() for line in storage.read_text(listing).splitlines() if line.strip()]


def check_key(ok: bool, key: str, expected: str, value) -> None:
  """A ``UserError`` naming ``config.data.<key>``, what it must be and what it is, unless ``ok``."""
  if not ok:
    raise UserError(f"config.data.{key} must be {expected}, got {value!r}")
