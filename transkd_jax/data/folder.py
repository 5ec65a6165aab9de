"""A dataset of your own (``config.data.name="folder"``): images and masks in two
directories, paired by file stem, with the classes in a small JSON (or YAML) file.

    ROOT/images/<stem>.png|.jpg|.jpeg     any depth: a stem may be "city/0001"
    ROOT/masks/<stem>.png                 single channel: the stored values
    ROOT/classes.json                     the classes (below)
    ROOT/splits/train.txt, val.txt        optional: one stem per line

``config.data`` keys (defaults in ``default_data_config``): ``root`` (local or a URI,
``gs://...``), ``folder_images`` ("images"), ``folder_masks`` ("masks"),
``folder_classes`` ("classes.json"), ``folder_splits`` ("": split by a seeded fraction;
else a directory of ``<split>.txt`` list files), ``folder_val_fraction`` (0.2) and
``folder_split_seed`` (0). The four paths are under ``root`` unless absolute or URIs.

The class file::

    {"names": ["road", "car", "sky"],          # train ids 0, 1, 2 (required)
     "palette": [[128, 64, 128], [0, 0, 142], [70, 130, 180]],   # optional
     "ignore": 255,                            # the stored value meaning "ignore" (255)
     "map": {"7": 0, "26": 1, "23": 2, "0": 255}}   # optional: stored value -> train id

Without ``map`` the stored values are the train ids (0 .. len(names)-1) or ``ignore``.
With it every stored value is a key of it (its train id, or 255: ignored) or ``ignore``.
Any other value is an error naming the mask, the values and the class file. YAML
(``.yaml`` / ``.yml``, the same keys) needs PyYAML importable.

Splits: with ``folder_splits`` each split is its list file's stems, in the listed order
(a line may also be a file name: ``a.png``). Without it the sorted stems are split into
``train`` and ``val``: ``round(folder_val_fraction * n)`` stems drawn by a generator
seeded with ``folder_split_seed`` go to ``val``, the rest to ``train`` (the same split on
every host and every run; adding files redraws it, list files do not move). An empty
split is an error naming how it was made.

Examples are ``readers.PairedSource``'s, in a fixed order, so grain's iterator state
resumes them exactly. The generated scenes as such a folder, for a first run
(``folder_example.py``)::

    python -m transkd_jax.data.folder_example /tmp/folder-data
"""

import dataclasses
import json
import math
import os
from typing import Optional

import numpy as np

from transkd_jax import storage
from transkd_jax.data.labels import IGNORE, ClassTable
from transkd_jax.data.readers import PairedSource, check_key, need_dir, stems_under
from transkd_jax.errors import UserError

try:  # optional: YAML class files
  import yaml
except ImportError:  # then a .yaml class file is refused, naming PyYAML
  yaml = None

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MASK_SUFFIXES = (".png",)
FRACTION_SPLITS = ("train", "val")
CLASS_KEYS = ("names", "palette", "ignore", "map")
LAYOUT = (
  "ROOT/<folder_images>/<stem>.png|.jpg|.jpeg and ROOT/<folder_masks>/<stem>.png "
  "(single-channel masks), ROOT/<folder_classes> (JSON or YAML: names, palette, ignore, "
  "map) and, with folder_splits, ROOT/<folder_splits>/<split>.txt listing stems"
)
CLASS_FILE = (
  '{"names": [...], "palette": [[r, g, b], ...] (optional), "ignore": 255 (optional), '
  '"map": {"<stored value>": <train id or 255>, ...} (optional)}'
)


def _both_cases(suffixes) -> tuple:
  return tuple(suffixes) + tuple(s.upper() for s in suffixes)


def _under(root: str, path) -> str:
  """``path`` under ``root`` unless it is absolute or a URI."""
  path = os.path.expanduser(str(path))
  return path if storage.is_uri(path) or os.path.isabs(path) else os.path.join(root, path)


def _root(data_config) -> str:
  """``config.data.root``, a directory (else an error naming it and the layout)."""
  root = os.path.expanduser(data_config.root)
  need_dir(root, "config.data.root", LAYOUT)
  return root


def classes_path(data_config) -> str:
  return _under(_root(data_config), data_config.folder_classes)


# --- the class file -----------------------------------------------------------------------------


def _int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True, eq=False)
class ClassFile:
  """A parsed class file; called as ``PairedSource``'s mapping: (mask, path) -> train ids.

  ``lut``: 256 entries, stored value -> train id (255: ignored), -1 where the value is
  not allowed.
  """

  path: str
  table: ClassTable
  ignore: int
  stored_map: Optional[dict]
  lut: np.ndarray

  def expected(self) -> str:
    if self.stored_map is None:
      return f"train ids 0-{self.table.num_classes - 1} or its ignore value {self.ignore}"
    keys = sorted(self.stored_map)
    shown = ", ".join(map(str, keys[:12])) + (", ..." if len(keys) > 12 else "")
    return f"a value of its map ({shown}) or its ignore value {self.ignore}"

  def __call__(self, mask: np.ndarray, where: str) -> np.ndarray:
    values = mask.astype(np.int64)
    outside = (values < 0) | (values > 255)
    if outside.any():
      raise UserError(
        f"mask {where} holds values {sorted(set(values[outside].tolist()))[:5]}; expected "
        f"8-bit values, which {self.path} maps to classes: {self.expected()}"
      )
    ids = self.lut[values]
    bad = ids < 0
    if bad.any():
      raise UserError(
        f"mask {where} holds values {sorted(set(values[bad].tolist()))[:5]} that the class file "
        f"{self.path} maps to no class; expected {self.expected()}"
      )
    return ids.astype(np.uint8)


def parse_classes(value, path: str) -> ClassFile:
  """A class file's content (a dict) -> ``ClassFile``; a ``UserError`` names the file and key."""

  def need(ok, key, expected, got):
    if not ok:
      shown = key if "[" in key else repr(key)  # 'names', or map['7']
      raise UserError(f"class file {path}: {shown} must be {expected}, got {got!r}")

  if not isinstance(value, dict):
    raise UserError(f"class file {path} holds a {type(value).__name__}; expected {CLASS_FILE}")
  unknown = sorted(set(map(str, value)) - set(CLASS_KEYS))
  if unknown:
    raise UserError(
      f"class file {path}: unknown key(s) {unknown}; expected some of {', '.join(CLASS_KEYS)}"
    )
  if "names" not in value:
    raise UserError(f"class file {path} has no 'names'; expected {CLASS_FILE}")
  names = value["names"]
  need(
    isinstance(names, list)
    and 0 < len(names) < IGNORE
    and all(isinstance(n, str) and n for n in names),
    "names",
    f"a list of 1-{IGNORE - 1} non-empty class names (train ids 0, 1, ...)",
    names,
  )
  repeated = sorted({n for n in names if names.count(n) > 1})
  need(not repeated, "names", "a list of distinct names", repeated)
  n = len(names)
  palette = value.get("palette")
  if palette is None:
    colours = ClassTable.numbered(n).palette
  else:
    need(
      isinstance(palette, list)
      and len(palette) == n
      and all(
        isinstance(c, list) and len(c) == 3 and all(_int(v) and 0 <= v <= 255 for v in c)
        for c in palette
      ),
      "palette",
      f"{n} colours [r, g, b] (one per name), each value 0-255",
      palette,
    )
    colours = np.array(palette, np.uint8)
  ignore = value.get("ignore", IGNORE)
  need(_int(ignore) and 0 <= ignore <= 255, "ignore", "a stored value 0-255", ignore)
  lut = np.full(256, -1, np.int16)
  lut[ignore] = IGNORE
  stored_map = value.get("map")
  if stored_map is None:
    need(
      ignore >= n,
      "ignore",
      f"a value that is no train id (>= {n}) when there is no 'map' (it is class "
      f"{names[ignore] if ignore < n else ''!r}); or give a 'map'",
      ignore,
    )
    lut[:n] = np.arange(n)
  else:
    need(
      isinstance(stored_map, dict) and stored_map,
      "map",
      "a non-empty mapping of stored values to train ids",
      stored_map,
    )
    parsed = {}
    for key, train_id in stored_map.items():
      stored = int(key) if isinstance(key, str) and key.strip().isdigit() else key
      need(_int(stored) and 0 <= stored <= 255, "map", "keyed by stored values 0-255", key)
      need(
        _int(train_id) and (0 <= train_id < n or train_id == IGNORE),
        f"map[{key!r}]",
        f"a train id 0-{n - 1} (an index into 'names') or {IGNORE} (ignored)",
        train_id,
      )
      need(stored != ignore, f"map[{key!r}]", f"absent: {key} is the ignore value", train_id)
      need(stored not in parsed, "map", f"keyed once per value ({stored} repeats)", key)
      parsed[stored] = train_id
      lut[stored] = train_id
    stored_map = parsed
  return ClassFile(path, ClassTable(tuple(names), colours), ignore, stored_map, lut)


def _kind(path: str) -> str:
  return "yaml" if path.lower().endswith((".yaml", ".yml")) else "json"


def read_classes(path: str) -> ClassFile:
  """The class file at ``path`` (JSON; ``.yaml`` / ``.yml``: YAML), checked."""
  if not storage.exists(path):
    raise UserError(
      f"class file {path} is missing (config.data.folder_classes, under config.data.root "
      f"unless absolute); expected {CLASS_FILE}"
    )
  text = storage.read_text(path)
  if _kind(path) == "yaml":
    if yaml is None:
      raise UserError(f"class file {path} is YAML, which needs PyYAML (pip install pyyaml)")
    try:
      value = yaml.safe_load(text)
    except yaml.YAMLError as e:
      raise UserError(f"class file {path} is not valid YAML ({e})") from None
  else:
    try:
      value = json.loads(text)
    except json.JSONDecodeError as e:
      raise UserError(f"class file {path} is not valid JSON ({e})") from None
  return parse_classes(value, path)


def class_table(data_config) -> ClassTable:
  """The dataset table's class table of ``config.data``: its class file's."""
  return read_classes(classes_path(data_config)).table


# --- pairs and splits ---------------------------------------------------------------------------


def pair_by_stem(image_dir: str, mask_dir: str) -> dict:
  """{stem: (image, mask)} in stem order; a mask with no image (or an image with no mask,
  or two images of one stem) is an error naming the file."""
  images = {}
  for found in stems_under(image_dir, _both_cases(IMAGE_SUFFIXES)).values():
    for stem, path in found.items():
      if stem in images:
        first, second = sorted((images[stem], path))
        raise UserError(f"images {first} and {second} share the stem {stem!r}; keep one")
      images[stem] = path
  masks = {}
  for found in stems_under(mask_dir, _both_cases(MASK_SUFFIXES)).values():
    masks.update(found)
  for stem in sorted(masks):
    if stem not in images:
      expected = os.path.join(image_dir, stem)
      raise UserError(f"mask {masks[stem]} has no image: expected {expected}.png (or .jpg, .jpeg)")
  for stem in sorted(images):
    if stem not in masks:
      raise UserError(
        f"image {images[stem]} has no mask: expected {os.path.join(mask_dir, stem)}.png"
      )
  if not images:
    raise UserError(f"{image_dir} holds no images (.png, .jpg, .jpeg); expected {LAYOUT}")
  return {stem: (images[stem], masks[stem]) for stem in sorted(images)}


def fraction_split(stems, fraction: float, seed: int) -> dict:
  """{"train": [...], "val": [...]} of ``stems`` (sorted first): ``round(fraction * n)``
  drawn for val by a generator seeded with ``seed``; each split in stem order."""
  stems = sorted(stems)
  count = math.floor(fraction * len(stems) + 0.5)
  val = set(np.random.default_rng(seed).permutation(len(stems))[:count].tolist())
  return {
    "train": [s for i, s in enumerate(stems) if i not in val],
    "val": [s for i, s in enumerate(stems) if i in val],
  }


def _listed_stem(line: str, pairs: dict) -> str:
  stem = os.path.normpath(line)
  if stem not in pairs:  # a file name: its stem
    base, ext = os.path.splitext(stem)
    if ext.lower() in IMAGE_SUFFIXES and base in pairs:
      return base
  return stem


def split_stems(data_config, split: str, pairs: dict) -> list:
  """The stems of ``split``: its list file's, or its part of the seeded fraction."""
  root = _root(data_config)
  if data_config.folder_splits:
    listing = os.path.join(_under(root, data_config.folder_splits), f"{split}.txt")
    if not storage.exists(listing):
      raise UserError(
        f"no split {split!r}: {listing} is missing (config.data.folder_splits="
        f"{data_config.folder_splits!r}); expected one stem per line"
      )
    lines = [line.strip() for line in storage.read_text(listing).splitlines() if line.strip()]
    stems = [_listed_stem(line, pairs) for line in lines]
    missing = [s for s in stems if s not in pairs]
    if missing:
      more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
      raise UserError(
        f"{listing} lists {missing[0]!r}{more}, which is no image/mask pair under "
        f"{_under(root, data_config.folder_images)}"
      )
    if not stems:
      raise UserError(f"split {split!r} is empty: its list file {listing} lists no stems")
    return stems
  fraction = data_config.folder_val_fraction
  how = (
    f"config.data.folder_splits is empty, so the {len(pairs)} pairs under {root} are split "
    f"by config.data.folder_val_fraction={fraction} (seed config.data.folder_split_seed="
    f"{data_config.folder_split_seed})"
  )
  if split not in FRACTION_SPLITS:
    raise UserError(
      f"no split {split!r}: {how} into {' and '.join(FRACTION_SPLITS)} only; name other "
      "splits with list files (config.data.folder_splits)"
    )
  stems = fraction_split(pairs, fraction, data_config.folder_split_seed)[split]
  if not stems:
    raise UserError(f"split {split!r} is empty: {how}, which leaves it none")
  return stems


def folder_items(data_config, split: str, classes: ClassFile) -> list:
  """(image, mask, mapping, name) of ``split``: ``PairedSource``'s items."""
  root = _root(data_config)
  dirs = []
  for key in ("folder_images", "folder_masks"):
    directory = _under(root, data_config[key])
    if not storage.isdir(directory):
      raise UserError(
        f"config.data.{key}={data_config[key]!r}: {directory} is not a directory; expected {LAYOUT}"
      )
    dirs.append(directory)
  pairs = pair_by_stem(*dirs)
  return [(*pairs[stem], classes, stem) for stem in split_stems(data_config, split, pairs)]


# --- the dataset table's row --------------------------------------------------------------------


def folder_source(data_config, split: str, num_classes: int = 0) -> PairedSource:
  """The folder's ``PairedSource`` for ``split``; masks mapped by its class file."""
  classes = read_classes(classes_path(data_config))
  del num_classes  # the class file's (the dataset table passes the same count)
  items = folder_items(data_config, split, classes)
  return PairedSource(items, classes.table.num_classes, bool(data_config.skip_bad_files))


def check(data_config) -> None:
  """The ``folder_*`` keys, touching no file (an empty root, as other datasets', is named
  when the folder is read)."""
  for key in ("folder_images", "folder_masks", "folder_classes"):
    value = data_config[key]
    check_key(isinstance(value, str) and bool(value), key, "a non-empty path", value)
  check_key(
    data_config.folder_images.rstrip("/") != data_config.folder_masks.rstrip("/"),
    "folder_masks",
    f"a directory other than config.data.folder_images ({data_config.folder_images!r})",
    data_config.folder_masks,
  )
  path = data_config.folder_classes
  check_key(
    path.lower().endswith((".json", ".yaml", ".yml")),
    "folder_classes",
    "a .json file (or .yaml / .yml)",
    path,
  )
  check_key(
    _kind(path) == "json" or yaml is not None,
    "folder_classes",
    "a .json file: YAML needs PyYAML (pip install pyyaml)",
    path,
  )
  check_key(
    isinstance(data_config.folder_splits, str),
    "folder_splits",
    "a directory of <split>.txt list files, or '' (split by folder_val_fraction)",
    data_config.folder_splits,
  )
  fraction = data_config.folder_val_fraction
  check_key(
    isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 <= fraction <= 1,
    "folder_val_fraction",
    "a number from 0 to 1",
    fraction,
  )
  seed = data_config.folder_split_seed
  check_key(_int(seed) and seed >= 0, "folder_split_seed", "a non-negative integer", seed)
