"""A stand-in object store for tests: ``gs://bucket/...`` redirected to a local directory for
every ``etils.epath`` call (etils' own epath mock; no network).

    with mock_bucket(tmp_path / "bucket") as local:  # gs://bucket/x is local / "x"
      ...

Only epath is redirected: code that opens a gs:// path with ``open`` / ``os`` would make
a local ``gs:`` directory, which the tests check is never there. Local paths pass through
unchanged; any other URI fails the test.
"""

import contextlib
import os

from etils.epath import testing as epath_testing

PREFIX = "gs://bucket"


@contextlib.contextmanager
def mock_bucket(local):
  local = str(local)
  os.makedirs(local, exist_ok=True)

  def to_local(path):
    path = os.fspath(path)
    if "://" not in path:
      return path
    assert path == PREFIX or path.startswith(PREFIX + "/"), path
    return local + path[len(PREFIX) :]

  def to_uri(path):  # a path listed under a redirected URI: that URI's
    return PREFIX + os.fspath(path)[len(local) :]

  def redirect(original, path, *args, **kwargs):
    return original(to_local(path), *args, **kwargs)

  def redirect_two(original, path, dst, *args, **kwargs):
    return original(to_local(path), to_local(dst), *args, **kwargs)

  def glob(original, pattern):
    found = original(to_local(pattern))
    return [to_uri(p) for p in found] if "://" in os.fspath(pattern) else found

  def walk(original, top, **kwargs):
    for root, dirs, files in original(to_local(top), **kwargs):
      yield (to_uri(root) if "://" in os.fspath(top) else root), dirs, files

  with epath_testing.mock_epath(
    open=redirect,
    exists=redirect,
    isdir=redirect,
    listdir=redirect,
    makedirs=redirect,
    mkdir=redirect,
    remove=redirect,
    rmtree=redirect,
    stat=redirect,
    glob=glob,
    walk=walk,
    copy=redirect_two,
    rename=redirect_two,
    replace=redirect_two,
  ):
    yield local
