"""Workdir paths: a gs:// URI stays a URI (every worker of a TPU slice writes to the same
bucket), and metrics and JSON files reach it through etils.epath. The object store is
stood in for by a local directory (etils' own epath mock); no network."""

import os

import pytest
from etils.epath import testing as epath_testing

from transkd_jax import checkpoint, logs, storage


def test_uris_stay_uris_and_local_paths_become_absolute(monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)
  assert storage.resolve("gs://bucket/runs/b0") == "gs://bucket/runs/b0"
  assert (
    storage.join("gs://bucket/runs/b0", "checkpoints", "3") == "gs://bucket/runs/b0/checkpoints/3"
  )
  assert storage.resolve("runs/b0") == str(tmp_path / "runs" / "b0")
  assert storage.join("~/b0", "x") == os.path.join(os.path.expanduser("~"), "b0", "x")


@pytest.fixture
def bucket(tmp_path):
  """gs://bucket/... redirected to tmp_path/bucket/... for every epath call."""

  def local(path):
    return str(path).replace("gs://bucket", str(tmp_path / "bucket"))

  def redirect(original, path, *args, **kwargs):
    assert str(path).startswith("gs://bucket"), path
    return original(local(path), *args, **kwargs)

  with epath_testing.mock_epath(
    open=redirect,
    exists=redirect,
    isdir=redirect,
    glob=redirect,
    makedirs=redirect,
    mkdir=redirect,
    listdir=redirect,
  ):
    yield tmp_path / "bucket"


def test_metrics_and_json_files_reach_the_bucket(bucket, monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)
  workdir = "gs://bucket/runs/b0"
  storage.makedirs(workdir)
  lines = storage.LineFile(storage.join(workdir, "metrics.jsonl"))
  lines.write('{"step": 1, "split": "train", "loss": 2.5}\n')
  lines.write('{"step": 2, "split": "train", "loss": 2.0}\n')
  lines.close()
  again = storage.LineFile(storage.join(workdir, "metrics.jsonl"))  # a resumed run: no append
  again.write('{"step": 3, "split": "val", "miou": 0.25}\n')
  assert [r["step"] for r in logs.read_metrics(workdir)] == [1, 2, 3]
  storage.write_json(storage.join(workdir, "eval_results.json"), {"miou": 0.25})
  assert storage.read_json(storage.join(workdir, "eval_results.json")) == {"miou": 0.25}
  assert storage.read_json(storage.join(workdir, "missing.json")) is None
  assert (bucket / "runs" / "b0" / "metrics.jsonl").read_text().count("\n") == 3
  assert not (tmp_path / "gs:").exists()  # nothing went to a local "gs:" directory
  assert not checkpoint.has_checkpoints(workdir)
  (bucket / "runs" / "b0" / "checkpoints").mkdir()
  assert checkpoint.has_checkpoints(workdir)
