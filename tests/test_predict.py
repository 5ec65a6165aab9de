"""``--mode=predict``: output sizes and palettes, the Cityscapes format scored by
cityscapesScripts' own evaluator equal to ours, and bad input named."""

import glob
import os
import shutil

import buckets
import numpy as np
import pytest
from PIL import Image
from runs import served_config

from transkd_jax.data.classes import CITYSCAPES_PALETTE
from transkd_jax.errors import UserError
from transkd_jax.evaluate import run_eval
from transkd_jax.predict import list_inputs, run_predict


def test_cityscapes_format_scored_by_cityscapesscripts_equals_ours(served, tmp_path):
  from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs_eval

  config = served_config(served, input=f"{served['root']}/leftImg8bit/val", cityscapes_format=True)
  summary = run_predict(config, str(tmp_path))
  assert summary["images"] == 3
  out = tmp_path / "predictions"
  stems = sorted(p.name[: -len("_trainIds.png")] for p in out.rglob("*_trainIds.png"))
  assert len(stems) == 3 and not any("leftImg8bit" in s for s in stems)
  gts = sorted(glob.glob(f"{served['root']}/gtFine/val/*/*_gtFine_labelIds.png"))
  preds = sorted(str(p) for p in (out / "cityscapes").rglob("*_labelIds.png"))
  assert [os.path.basename(p).split("_labelIds")[0] for p in preds] == [
    os.path.basename(g).split("_gtFine")[0] for g in gts
  ]
  args = cs_eval.args
  args.evalInstLevelScore, args.JSONOutput, args.quiet = False, False, True
  scores = cs_eval.evaluateImgLists(preds, gts, args)
  ours = run_eval(served_config(served), str(tmp_path))["miou"]
  assert scores["averageScoreClasses"] == pytest.approx(ours, abs=1e-9)


def test_predict_sizes_palette_and_native_resolution(served, tmp_path):
  other = tmp_path / "in"
  other.mkdir()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (50, 70, 3), np.uint8)).save(other / "odd.jpg")
  Image.fromarray(rng.integers(0, 255, (96, 40, 3), np.uint8)).save(other / "tall.png")
  for resize in (True, False):
    out = tmp_path / f"out_{resize}"
    run_predict(
      served_config(served, input=str(other), resize=resize, output_dir=str(out)), str(tmp_path)
    )
    for name, (h, w) in (("odd", (50, 70)), ("tall", (96, 40))):
      ids = np.asarray(Image.open(out / f"{name}_trainIds.png"))
      colour = np.asarray(Image.open(out / f"{name}_color.png"))
      over = np.asarray(Image.open(out / f"{name}_overlay.png"))
      assert ids.shape == (h, w) and colour.shape == over.shape == (h, w, 3)
      assert ids.max() < 19
      np.testing.assert_array_equal(colour, CITYSCAPES_PALETTE[ids])


def test_bad_inputs_are_named(served, tmp_path):
  with pytest.raises(UserError, match=r"config.predict.input='.*nothing\*.png' matches no"):
    list_inputs(str(tmp_path / "nothing*.png"))
  (tmp_path / "notes.png").write_text("not an image")
  with pytest.raises(UserError, match="cannot decode image .*notes.png"):
    run_predict(served_config(served, input=str(tmp_path / "notes.png")), str(tmp_path))
  config = served_config(served, input=str(tmp_path / "notes.png"), cityscapes_format=True)
  config.num_classes = 21
  config.data.name = "voc"
  with pytest.raises(UserError, match="cityscapes_format=True needs Cityscapes' 19 classes"):
    run_predict(config, str(tmp_path))


def test_inputs_and_outputs_in_a_bucket(served, tmp_path, monkeypatch):
  """config.predict.input and output_dir as gs:// URIs (tests/buckets.py: etils' epath
  mock, no network): a directory searched at every depth, a glob, a file."""
  monkeypatch.chdir(tmp_path)
  bucket = tmp_path / "bucket"
  shutil.copytree(f"{served['root']}/leftImg8bit/val", bucket / "in")
  (bucket / "in" / "notes.txt").write_text("not an image")
  with buckets.mock_bucket(bucket):
    inputs = list_inputs("gs://bucket/in")
    assert [stem for _, stem in inputs] == [
      f"synthetic/{os.path.basename(p).split('_leftImg8bit')[0]}"
      for p in sorted(glob.glob(f"{served['root']}/leftImg8bit/val/*/*.png"))
    ]
    assert all(path.startswith("gs://bucket/in/synthetic/") for path, _ in inputs)
    assert list_inputs("gs://bucket/in/*/*.png") == [(p, s.split("/")[1]) for p, s in inputs]
    assert list_inputs(inputs[0][0]) == [(inputs[0][0], inputs[0][1].split("/")[1])]
    with pytest.raises(UserError, match=r"\*\* is not supported in a URI"):
      list_inputs("gs://bucket/in/**/*.png")
    with pytest.raises(UserError, match="'gs://bucket/none/\\*.png' matches no"):
      list_inputs("gs://bucket/none/*.png")
    config = served_config(served, input="gs://bucket/in", output_dir="gs://bucket/out")
    summary = run_predict(config, str(tmp_path))
  assert summary["images"] == 3 and summary["output_dir"] == "gs://bucket/out"
  for _, stem in inputs:
    ids = np.asarray(Image.open(bucket / "out" / f"{stem}_trainIds.png"))
    colour = np.asarray(Image.open(bucket / "out" / f"{stem}_color.png"))
    assert ids.shape == (64, 128) and ids.max() < 19
    np.testing.assert_array_equal(colour, CITYSCAPES_PALETTE[ids])
  assert not (tmp_path / "gs:").exists()  # nothing went to a local "gs:" directory
