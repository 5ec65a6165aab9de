"""Metrics against confusion matrices and IoUs computed by hand; ``--mode=eval`` on
generated data with a converted-style checkpoint against an independent numpy
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

from transkd_jax import evaluate
from transkd_jax.data.classes import CITYSCAPES_ID_TO_TRAIN
from transkd_jax.errors import UserError
from transkd_jax.evaluate import run_eval

# 3 classes; label 255 is ignored. Row = label, column = prediction.
LABEL = np.array([[[0, 0, 1, 255], [1, 1, 0, 0]]])
PRED = np.array([[[0, 1, 1, 2], [1, 0, 0, 0]]])


def test_confusion_matrix_by_hand():
  cm = np.asarray(evaluate.confusion_matrix(jnp.asarray(PRED), jnp.asarray(LABEL), 3))
  # label 0 at 4 pixels: predicted 0, 1, 0, 0; label 1 at 3 pixels: predicted 1, 1, 0.
  np.testing.assert_array_equal(cm, [[3, 1, 0], [1, 2, 0], [0, 0, 0]])
  # Padding examples (valid False) count nothing.
  both = jnp.asarray(np.concatenate([PRED, PRED])), jnp.asarray(np.concatenate([LABEL, LABEL]))
  cm2 = evaluate.confusion_matrix(*both, 3, valid=jnp.asarray([True, False]))
  np.testing.assert_array_equal(cm2, cm)


def test_both_protocols_by_hand():
  cm = np.array([[3, 1, 0], [1, 2, 0], [0, 0, 0]])
  # IoU_0 = 3 / (4 + 4 - 3) = 0.6; IoU_1 = 2 / (3 + 3 - 2) = 0.5; class 2 absent.
  standard = evaluate.miou_from_confusion(cm, "standard")
  assert standard["miou"] == pytest.approx(0.55)
  assert np.isnan(standard["per_class"][2])
  reference = evaluate.miou_from_confusion(cm, "reference")
  assert reference["miou"] == pytest.approx(1.1 / 3)  # absent class counts 0
  assert standard["pixel_acc"] == pytest.approx(5 / 7) == reference["pixel_acc"]
  # A class predicted but never labelled is present (IoU 0) in both.
  cm_fp = np.array([[3, 1, 1], [1, 2, 0], [0, 0, 0]])
  assert evaluate.miou_from_confusion(cm_fp, "standard")["miou"] == pytest.approx(
    (3 / 6 + 0.5 + 0.0) / 3
  )
  with pytest.raises(ValueError, match="unknown evaluation protocol"):
    evaluate.miou_from_confusion(cm, "cityscapes")


def test_protocols_compare_at_different_resolutions():
  logits = jnp.zeros((1, 2, 2, 3)).at[0, :, :, 1].set(1.0)  # predicts class 1 everywhere
  labels = jnp.ones((1, 8, 8), jnp.int32)
  pred, lab = evaluate.predictions_for(logits, labels, "standard")
  assert pred.shape == lab.shape == (1, 8, 8)
  pred, lab = evaluate.predictions_for(logits, labels, "reference")
  assert pred.shape == lab.shape == (1, 2, 2)
  assert bool(jnp.all(pred == 1))


def test_per_example_sizes_match_plain_resizes_on_padded_labels():
  from transkd_jax.models.resize import resize_nearest

  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 8, 12, 5)), jnp.float32)
  sizes = jnp.asarray([[30, 45], [32, 48]], jnp.int32)
  pred = np.asarray(evaluate.predictions_at_sizes(logits, (32, 48), sizes))
  for i, (h, w) in enumerate(np.asarray(sizes)):
    expected = np.asarray(evaluate.predictions_at(logits[i : i + 1], (int(h), int(w))))[0]
    np.testing.assert_array_equal(pred[i, :h, :w], expected)
  labels = jnp.asarray(rng.integers(0, 5, (2, 32, 48)), jnp.int32)
  small = np.asarray(evaluate.labels_at_sizes(labels, (8, 12), sizes))
  for i, (h, w) in enumerate(np.asarray(sizes)):
    expected = np.asarray(resize_nearest(labels[i : i + 1, :h, :w], (8, 12)))[0]
    np.testing.assert_array_equal(small[i], expected)


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
