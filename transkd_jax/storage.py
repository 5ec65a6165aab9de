"""Paths of workdirs and checkpoints: local directories or object-store URIs (``gs://...``).

A TPU slice's workers share no disk; they share a bucket. Every path a run
writes (checkpoints, metrics, TensorBoard, JSON results) goes through here or
through Orbax, and a URI stays a URI: ``os.path.abspath("gs://b/run")`` would
be a local directory named ``gs:``, different on every worker. Local paths are
expanded (``~``) and made absolute, as before. Files go through
``etils.epath`` (gs:// needs ``gcsfs``: ``pip install -e '.[gcs]'`` or
``'.[tpu]'``); Orbax writes gs:// checkpoints itself.

Datasets and inputs are read through here too: ``glob``, ``files_under`` and
``relpath`` keep a URI's paths URIs, and leave local paths as they are given
(not made absolute), listed by Python's ``glob`` as before.
"""

import contextlib
import glob as glob_lib
import json
import os
import re
import shutil
import tempfile

from etils import epath

_WILDCARD = re.compile(r"[*?[]")


def is_uri(path) -> bool:
  return "://" in str(path)


def resolve(path) -> str:
  """A URI unchanged; a local path expanded and absolute."""
  path = str(path)
  return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))


def join(path, *parts) -> str:
  return str(epath.Path(resolve(path)).joinpath(*parts))


def isdir(path) -> bool:
  return epath.Path(resolve(path)).is_dir()


def exists(path) -> bool:
  return epath.Path(resolve(path)).exists()


def makedirs(path):
  epath.Path(resolve(path)).mkdir(parents=True, exist_ok=True)


def read_text(path) -> str:
  return epath.Path(resolve(path)).read_text()


def write_text(path, text: str):
  epath.Path(resolve(path)).write_text(text)


def write_json(path, value, **kwargs):
  write_text(path, json.dumps(value, **kwargs))


def read_json(path, default=None):
  return json.loads(read_text(path)) if exists(path) else default


def read_bytes(path) -> bytes:
  return epath.Path(resolve(path)).read_bytes()


def glob(pattern) -> list:
  """The paths matching ``pattern`` (``*``, ``?``, ``[...]``), sorted.

  A local pattern is Python's ``glob`` with ``**`` for any depth. A URI pattern
  is split at its first component with a wildcard and the rest matched under
  the part before it; its matches are URIs. ``**`` would list a whole bucket
  tree level by level: it is refused there (ValueError); ``files_under`` lists
  a tree.
  """
  pattern = str(pattern)
  if not is_uri(pattern):
    return sorted(glob_lib.glob(pattern, recursive=True))
  if "**" in pattern:
    raise ValueError(f"{pattern}: ** is not supported in a URI pattern")
  parts = pattern.split("/")
  first = next((i for i, part in enumerate(parts) if _WILDCARD.search(part)), len(parts) - 1)
  base, rest = "/".join(parts[:first]), "/".join(parts[first:])
  return sorted(str(path) for path in epath.Path(base).glob(rest))


def files_under(directory, suffixes=("",)) -> list:
  """The paths under ``directory``, at any depth, whose names end with one of ``suffixes``,
  sorted; names starting with "." are skipped, as ``glob`` skips them.

  Locally Python's ``glob`` of ``directory/**/*`` (which lists matching directories
  too). Under a URI one walk of the tree, files only, as URIs: one listing per
  directory, not one request per file. A missing directory has none.
  """
  directory = str(directory)
  suffixes = (suffixes,) if isinstance(suffixes, str) else tuple(suffixes)
  if not is_uri(directory):
    found = glob_lib.glob(os.path.join(directory, "**", "*"), recursive=True)
    return sorted(path for path in found if path.endswith(suffixes))
  top = directory.rstrip("/")
  top_key = top.split("://", 1)[1]
  found = []
  for root, _, names in epath.Path(top).walk():
    key = str(root).split("://", 1)[-1].strip("/")  # fsspec's walk drops the scheme
    rel = key[len(top_key) :].strip("/")
    if any(part.startswith(".") for part in rel.split("/")):
      continue
    base = f"{top}/{rel}" if rel else top
    found += [f"{base}/{n}" for n in names if not n.startswith(".") and n.endswith(suffixes)]
  return sorted(found)


def relpath(path, start) -> str:
  """``path`` relative to the directory ``start``; under a URI, the part of ``path`` after
  ``start/``."""
  path, start = str(path), str(start)
  if not is_uri(path):
    return os.path.relpath(path, start)
  start = start.rstrip("/") + "/"
  return path[len(start) :] if path.startswith(start) else path


@contextlib.contextmanager
def staged(path):
  """A local file name to write ``path`` through; ``path`` appears whole when the block ends.

  Locally ``path.tmp``, renamed to ``path``. For a URI a file in a temporary local
  directory, then copied to the URI (an object store has no rename; an object
  appears when its upload completes).
  """
  path = resolve(path)
  if not is_uri(path):
    yield path + ".tmp"
    os.replace(path + ".tmp", path)
    return
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, path.rstrip("/").rsplit("/", 1)[-1])
    yield local
    with open(local, "rb") as src, epath.Path(path).open("wb") as dst:
      shutil.copyfileobj(src, dst, 1 << 20)


class LineFile:
  """A text file that grows by whole lines, on a local disk or an object store.

  Object stores have no append: there, the lines read at start plus those
  written since are rewritten whole on each ``write`` (metrics files are small).
  """

  def __init__(self, path):
    self.path = resolve(path)
    self._lines = None
    self._file = None
    if is_uri(self.path):
      self._lines = read_text(self.path).splitlines(keepends=True) if exists(self.path) else []
    else:
      self._file = open(self.path, "a")

  def write(self, line: str):
    if self._file is not None:
      self._file.write(line)
      self._file.flush()
    else:
      self._lines.append(line)
      write_text(self.path, "".join(self._lines))

  def close(self):
    if self._file is not None:
      self._file.close()
