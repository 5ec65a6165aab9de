"""``--mode=eval`` on generated data with a converted-style checkpoint against an independent numpy
computation; bad checkpoints named."""

import glob
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from runs import REPO, served_config

from transkd_jax.data.classes import CITYSCAPES_ID_TO_TRAIN
from transkd_jax.errors import UserError
from transkd_jax.evaluate import run_eval

# ---------------------------------------------------------------- --mode=eval


def _numpy_miou(served):
  """Standard-protocol mIoU computed independently: per image, numpy confusion matrix."""
  from transkd_jax.models.resize import resize_bilinear

  cm = np.zeros((19, 19), np.int64)
  apply = jax.jit(served["model"].apply, static_argnames="train")  # one compile, not op by op
  for path in sorted(glob.glob(f"{served['root']}/leftImg8bit/val/*/*.png")):
    image = np.asarray(Image.open(path).convert("RGB"), np.float32)[None] / 255.0
    gt = path.replace("leftImg8bit", "gtFine").replace("gtFine.png", "gtFine_labelIds.png")
    label = CITYSCAPES_ID_TO_TRAIN[np.asarray(Image.open(gt))]
    logits = apply(served["variables"], image, train=False)["logits"]
    pred = np.asarray(jnp.argmax(resize_bilinear(logits, label.shape), -1))[0]
    keep = label != 255
    np.add.at(cm, (label[keep], pred[keep]), 1)
  tp = np.diag(cm)
  union = cm.sum(0) + cm.sum(1) - tp
  return float(np.mean(tp[union > 0] / union[union > 0])), cm


def test_eval_matches_numpy_and_writes_results(served, tmp_path):
  results = run_eval(served_config(served), str(tmp_path))
  expected, cm = _numpy_miou(served)
  assert results["miou"] == pytest.approx(expected, abs=1e-6)
  assert len(np.unique(np.nonzero(cm)[1])) > 1  # the model predicts several classes
  written = json.loads((tmp_path / "eval_results.json").read_text())
  assert written["protocol"] == "standard" and written["num_images"] == 3
  assert set(written["per_class"]) >= {"road", "sky", "car"}
  assert written["miou"] == pytest.approx(expected, abs=1e-6)
  absent = [n for n, i in zip(written["per_class"], range(19)) if cm[i].sum() + cm[:, i].sum() == 0]
  assert all(written["per_class"][n] is None for n in absent)


def test_bad_checkpoints_are_named(served, tmp_path):
  config = served_config(served)
  config.num_classes = 21
  with pytest.raises(
    UserError,
    match=r"config.eval.checkpoint=.*ckpt does not fit "
    r"SegFormer-B0 with 21 classes.*linear_pred",
  ):
    run_eval(config, str(tmp_path))
  config = served_config(served)
  config.eval.variant = "b1"
  with pytest.raises(UserError, match="does not fit SegFormer-B1"):
    run_eval(config, str(tmp_path))
  config = served_config(served)
  config.eval.checkpoint = ""
  with pytest.raises(UserError, match="holds no checkpoints/"):
    run_eval(config, str(tmp_path))


def test_main_eval_mode_end_to_end(served, tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "transkd_jax.main",
      f"--config={REPO / 'configs/synthetic.py'}",
      f"--workdir={tmp_path}",
      "--mode=eval",
      f"--config.eval.checkpoint={served['ckpt']}",
      "--config.image_size=(64,128)",
      f"--config.data.root={served['root']}",
      "--config.data.num_train=4",
      "--config.data.num_val=3",
      "--config.data.generated_size=(64,128)",
      "--config.eval_protocol=reference",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert result.returncode == 0, result.stderr
  assert "reference protocol" in result.stdout and "road" in result.stdout
  assert json.loads((tmp_path / "eval_results.json").read_text())["protocol"] == "reference"


@pytest.mark.parametrize("arch", ["pvtv2"])  # LVT keeps batch_stats, as SegFormer does
def test_the_other_families_evaluate(served, tmp_path, arch):
  """A PVTv2 student (no batch_stats): eval equals the numpy mIoU. (Predict reads weights
  through the same build.serving.)"""
  import jax
  import orbax.checkpoint as ocp
  from runs import TINY_LVT, TINY_PVT, set_variant

  from transkd_jax.models import archs

  row = {"pvtv2": TINY_PVT, "lvt": TINY_LVT}[arch]
  model = archs.build(arch, row, 19)
  variables = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 64, 128, 3)))
  assert ("batch_stats" in variables) == archs.has_batch_stats(arch)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "ckpt", dict(variables))
  config = served_config(served)
  config.student.arch = arch
  set_variant(config, "student", row)
  config.eval.checkpoint = str(tmp_path / "ckpt")
  results = run_eval(config, str(tmp_path))
  expected, _ = _numpy_miou({**served, "model": model, "variables": variables})
  assert results["miou"] == pytest.approx(expected, abs=1e-6)
