"""Workdir paths: a gs:// URI stays a URI (every worker of a TPU slice writes to the same
bucket), and metrics and JSON files reach it through etils.epath. The object store is
stood in for by a local directory (etils' own epath mock); no network."""

import os

import buckets
import pytest

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
  with buckets.mock_bucket(tmp_path / "bucket"):
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


def test_listing_and_staged_files_keep_uris(bucket, monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)
  for name in ("a/x_1.png", "a/b/y_1.png", "a/b/z.txt", "a/.hidden/w_1.png", "a/.v_1.png"):
    (bucket / name).parent.mkdir(parents=True, exist_ok=True)
    (bucket / name).write_bytes(b"1")
  top = "gs://bucket/a"
  assert storage.files_under(top, "_1.png") == [f"{top}/b/y_1.png", f"{top}/x_1.png"]
  assert storage.files_under(top + "/", (".txt", "x_1.png")) == [f"{top}/b/z.txt", f"{top}/x_1.png"]
  assert storage.files_under("gs://bucket/missing") == []
  assert storage.glob(f"{top}/*/*.png") == [f"{top}/b/y_1.png"]
  assert storage.glob(f"{top}/x_1.png") == [f"{top}/x_1.png"]
  with pytest.raises(ValueError, match=r"\*\* is not supported"):
    storage.glob(f"{top}/**/*.png")
  assert storage.relpath(f"{top}/b/y_1.png", top) == "b/y_1.png"
  assert storage.read_bytes(f"{top}/b/z.txt") == b"1"
  storage.makedirs(f"{top}/new")
  with storage.staged(f"{top}/new/w.bin") as local:
    assert not storage.is_uri(local)
    with open(local, "wb") as f:
      f.write(b"whole")
  assert (bucket / "a" / "new" / "w.bin").read_bytes() == b"whole"
  # Local paths: as given, listed by glob (hidden names skipped), staged beside.
  local_top = str(bucket / "a")
  assert storage.files_under(local_top, "_1.png") == [
    f"{local_top}/b/y_1.png",
    f"{local_top}/x_1.png",
  ]
  with storage.staged(f"{local_top}/w.bin") as local:
    assert local == f"{local_top}/w.bin.tmp"
    with open(local, "wb") as f:
      f.write(b"2")
  assert (bucket / "a" / "w.bin").read_bytes() == b"2" and not (bucket / "a" / "w.bin.tmp").exists()
  assert not (tmp_path / "gs:").exists()
