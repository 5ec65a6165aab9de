"""--mode=eval and --mode=predict on generated data with a converted-style checkpoint:
results against an independent numpy computation and cityscapesScripts' own evaluator,
output sizes and palettes, and bad input named."""

import glob
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from transkd_jax import convert
from transkd_jax.config import base_config
from transkd_jax.data import generated
from transkd_jax.data.classes import CITYSCAPES_ID_TO_TRAIN, CITYSCAPES_PALETTE
from transkd_jax.errors import UserError
from transkd_jax.evaluate import run_eval
from transkd_jax.models import SegFormer
from transkd_jax.predict import list_inputs, run_predict

REPO = pathlib.Path(__file__).resolve().parent.parent
SIZE = (64, 128)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A generated tree and a B0 'converted' checkpoint whose head predicts several classes."""
  base = tmp_path_factory.mktemp("evalpred")
  root = str(base / "tree")
  generated.write_dataset(root, 4, 3, SIZE, seed=0)
  model = SegFormer("b0", 19)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1,) + SIZE + (3,)))
  # A random head predicts one class everywhere; a larger classifier spreads the argmax.
  variables = jax.tree_util.tree_map_with_path(
      lambda p, x: x * 30 if "linear_pred" in jax.tree_util.keystr(p) else x, variables)
  ckpt = str(base / "ckpt")
  convert.save(jax.device_get(variables), ckpt, {"arch": "mit_b0", "num_classes": 19})
  return {"root": root, "ckpt": ckpt, "model": model, "variables": variables}


def _config(setup, **predict):
  config = base_config()
  config.image_size = SIZE
  config.batch_size = 2
  config.method = "student"
  config.eval.checkpoint = setup["ckpt"]
  config.data.update({"root": setup["root"], "num_train": 4, "num_val": 3,
                      "generated_size": SIZE})
  config.predict.update(predict)
  return config


def _numpy_miou(setup):
  """Standard-protocol mIoU computed independently: per image, numpy confusion matrix."""
  from transkd_jax.models.resize import resize_bilinear
  cm = np.zeros((19, 19), np.int64)
  for path in sorted(glob.glob(f"{setup['root']}/leftImg8bit/val/*/*.png")):
    image = np.asarray(Image.open(path).convert("RGB"), np.float32)[None] / 255.0
    gt = path.replace("leftImg8bit", "gtFine").replace("gtFine.png", "gtFine_labelIds.png")
    label = CITYSCAPES_ID_TO_TRAIN[np.asarray(Image.open(gt))]
    logits = setup["model"].apply(setup["variables"], image, train=False)["logits"]
    pred = np.asarray(jnp.argmax(resize_bilinear(logits, label.shape), -1))[0]
    keep = label != 255
    np.add.at(cm, (label[keep], pred[keep]), 1)
  tp = np.diag(cm)
  union = cm.sum(0) + cm.sum(1) - tp
  return float(np.mean(tp[union > 0] / union[union > 0])), cm


def test_eval_matches_numpy_and_writes_results(setup, tmp_path):
  results = run_eval(_config(setup), str(tmp_path))
  expected, cm = _numpy_miou(setup)
  assert results["miou"] == pytest.approx(expected, abs=1e-6)
  assert len(np.unique(np.nonzero(cm)[1])) > 1  # the model predicts several classes
  written = json.loads((tmp_path / "eval_results.json").read_text())
  assert written["protocol"] == "standard" and written["num_images"] == 3
  assert set(written["per_class"]) >= {"road", "sky", "car"}
  assert written["miou"] == pytest.approx(expected, abs=1e-6)
  absent = [n for n, i in zip(written["per_class"], range(19))
            if cm[i].sum() + cm[:, i].sum() == 0]
  assert all(written["per_class"][n] is None for n in absent)


def test_cityscapes_format_scored_by_cityscapesscripts_equals_ours(setup, tmp_path):
  from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs_eval
  config = _config(setup, input=f"{setup['root']}/leftImg8bit/val", cityscapes_format=True)
  summary = run_predict(config, str(tmp_path))
  assert summary["images"] == 3
  out = tmp_path / "predictions"
  stems = sorted(p.name[:-len("_trainIds.png")] for p in out.rglob("*_trainIds.png"))
  assert len(stems) == 3 and not any("leftImg8bit" in s for s in stems)
  gts = sorted(glob.glob(f"{setup['root']}/gtFine/val/*/*_gtFine_labelIds.png"))
  preds = sorted(str(p) for p in (out / "cityscapes").rglob("*_labelIds.png"))
  assert [os.path.basename(p).split("_labelIds")[0] for p in preds] == \
      [os.path.basename(g).split("_gtFine")[0] for g in gts]
  args = cs_eval.args
  args.evalInstLevelScore, args.JSONOutput, args.quiet = False, False, True
  scores = cs_eval.evaluateImgLists(preds, gts, args)
  ours = run_eval(_config(setup), str(tmp_path))["miou"]
  assert scores["averageScoreClasses"] == pytest.approx(ours, abs=1e-9)


def test_predict_sizes_palette_and_native_resolution(setup, tmp_path):
  other = tmp_path / "in"
  other.mkdir()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (50, 70, 3), np.uint8)).save(other / "odd.jpg")
  Image.fromarray(rng.integers(0, 255, (96, 40, 3), np.uint8)).save(other / "tall.png")
  for resize in (True, False):
    out = tmp_path / f"out_{resize}"
    run_predict(_config(setup, input=str(other), resize=resize, output_dir=str(out)),
                str(tmp_path))
    for name, (h, w) in (("odd", (50, 70)), ("tall", (96, 40))):
      ids = np.asarray(Image.open(out / f"{name}_trainIds.png"))
      colour = np.asarray(Image.open(out / f"{name}_color.png"))
      over = np.asarray(Image.open(out / f"{name}_overlay.png"))
      assert ids.shape == (h, w) and colour.shape == over.shape == (h, w, 3)
      assert ids.max() < 19
      np.testing.assert_array_equal(colour, CITYSCAPES_PALETTE[ids])


def test_bad_inputs_are_named(setup, tmp_path):
  with pytest.raises(UserError, match=r"config.predict.input='.*nothing\*.png' matches no"):
    list_inputs(str(tmp_path / "nothing*.png"))
  (tmp_path / "notes.png").write_text("not an image")
  with pytest.raises(UserError, match="cannot decode image .*notes.png"):
    run_predict(_config(setup, input=str(tmp_path / "notes.png")), str(tmp_path))
  config = _config(setup)
  config.num_classes = 21
  with pytest.raises(UserError, match=r"config.eval.checkpoint=.*ckpt does not fit "
                                      r"SegFormer-B0 with 21 classes.*linear_pred"):
    run_eval(config, str(tmp_path))
  config = _config(setup)
  config.eval.variant = "b1"
  with pytest.raises(UserError, match="does not fit SegFormer-B1"):
    run_eval(config, str(tmp_path))
  config = _config(setup)
  config.eval.checkpoint = ""
  with pytest.raises(UserError, match="holds no checkpoints/"):
    run_eval(config, str(tmp_path))
  config = _config(setup, input=str(tmp_path / "notes.png"), cityscapes_format=True)
  config.num_classes = 21
  config.data.name = "voc"
  with pytest.raises(UserError, match="cityscapes_format=True needs Cityscapes' 19 classes"):
    run_predict(config, str(tmp_path))


def test_main_eval_mode_end_to_end(setup, tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "transkd_jax.main", f"--config={REPO / 'configs/synthetic.py'}",
       f"--workdir={tmp_path}", "--mode=eval", f"--config.eval.checkpoint={setup['ckpt']}",
       "--config.image_size=(64,128)", f"--config.data.root={setup['root']}",
       "--config.data.num_train=4", "--config.data.num_val=3",
       "--config.data.generated_size=(64,128)", "--config.eval_protocol=reference"],
      cwd=REPO, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr
  assert "reference protocol" in result.stdout and "road" in result.stdout
  assert json.loads((tmp_path / "eval_results.json").read_text())["protocol"] == "reference"
