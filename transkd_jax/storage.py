"""Paths of workdirs and checkpoints: local directories or object-store URIs (``gs://...``).

A TPU slice's workers share no disk; they share a bucket. Every path a run
writes (checkpoints, metrics, TensorBoard, JSON results) goes through here or
through Orbax, and a URI stays a URI: ``os.path.abspath("gs://b/run")`` would
be a local directory named ``gs:``, different on every worker. Local paths are
expanded (``~``) and made absolute, as before. Files go through
``etils.epath`` (gs:// needs ``gcsfs``: ``pip install -e '.[gcs]'`` or
``'.[tpu]'``); Orbax writes gs:// checkpoints itself.
"""

import json
import os

from etils import epath


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
