"""The eval step's metrics against confusion matrices and IoUs computed by hand, both
protocols, and the split's sums accumulated on the device against per-batch host sums."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from runs import served_config

from transkd_jax import build, data, sharding
from transkd_jax import eval_step as evaluate
from transkd_jax.models.resize import resize_nearest

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


def test_device_sums_stay_exact_past_int32():
  big = jnp.full((2, 2), 2**30 - 1, jnp.int32)
  outputs = (big, jnp.float32(0.5), jnp.int32(2**30 - 1), jnp.int32(2))
  totals = None
  for _ in range(5):  # 5 x (2**30 - 1) > 2**31
    totals = evaluate._accumulate(totals, outputs)
  cm, ce, pixels, images = jax.device_get(totals)
  np.testing.assert_array_equal(evaluate._exact(cm), np.full((2, 2), 5 * (2**30 - 1), np.int64))
  assert int(evaluate._exact(pixels)) == 5 * (2**30 - 1)
  assert float(ce) == 2.5 and int(images) == 10


def test_split_sums_on_the_device_equal_per_batch_host_sums(served):
  """What evaluate_split computed before it kept its sums on the device: the same."""
  config = served_config(served)
  mesh = build.mesh_of(config)
  step = build.make_eval_step(config, mesh)
  variables = sharding.put_global(jax.device_get(served["variables"]), sharding.replicated(mesh))
  got = evaluate.evaluate_split(config, mesh, step, variables, "val")
  cm = np.zeros((19, 19), np.int64)
  ce, pixels, images = 0.0, 0, 0
  for batch in data.make_eval_iterator(config, split="val"):
    local = {k: batch[k] for k in ("image", "label", "valid", "label_size") if k in batch}
    b_cm, b_ce, b_px, b_images = step(variables, sharding.global_batch(local, mesh))
    cm += np.asarray(b_cm)
    ce += float(b_ce)
    pixels += int(b_px)
    images += int(b_images)
  np.testing.assert_array_equal(got["confusion"], cm)
  assert got["num_images"] == images == 3
  assert got["loss"] == pytest.approx(ce / pixels, rel=1e-6)
  assert got["miou"] == evaluate.miou_from_confusion(cm)["miou"]
