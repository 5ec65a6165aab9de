"""The train step: sharded over 8 devices equals one device; full-resolution labels get
upsampled logits in the cross-entropy; micro-batches add up to the whole batch."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from flax import traverse_util
from runs import REPO, TINY_PVT, set_variant, tiny_config

from transkd_jax import build
from transkd_jax.distill.losses import cross_entropy
from transkd_jax.errors import UserError
from transkd_jax.models.resize import resize_bilinear


def test_sharded_step_equals_single_device():
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=(
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip(),
  )
  result = subprocess.run(
    [sys.executable, str(REPO / "tests" / "sharded_step_check.py")],
    capture_output=True,
    text=True,
    env=env,
    timeout=600,
    cwd=REPO,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  for name in ("fsdp",):
    assert out[name]["max_param_diff"] < 1e-6, out
    np.testing.assert_allclose(out[name]["losses"], out["losses"], rtol=1e-5)
  assert out["fsdp"]["fc1_spec"] != "P()"  # parameters really were split along "model"


def test_full_resolution_labels_and_accumulated_micro_batches(monkeypatch):
  """Full-size labels (the mmseg protocol): the CE compares logits upsampled bilinearly
  to them. grad_accum_steps=2: a student step on 4 examples as 2 micro-batches equals the
  step on the whole batch (logit KD, where the teacher runs per micro-batch, was checked the
  same way by hand: loss 2.9750938 both). A PVTv2 student: no BatchNorm,
  whose micro-batch statistics differ by design (as do TransKD's fusion modules'); no
  dropout; every label set, so each micro-batch's mean CE weighs as many pixels. SGD with
  lr 1: the update is the gradient itself."""
  monkeypatch.setattr(build, "make_optimizer", lambda opt, steps: (optax.sgd(1.0), lambda s: 1.0))
  rng = np.random.default_rng(0)
  batch = {
    "image": rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8),
    "label": rng.integers(0, 5, (4, 64, 64)).astype(np.int32),
  }
  updates, losses = {}, {}
  for k in (1, 2):
    config = tiny_config(method="student", num_classes=5, image_size=(64, 64))
    config.update(batch_size=4, grad_accum_steps=k)
    config.student.arch = "pvtv2"
    set_variant(config, "student", TINY_PVT._replace(drop_path_rate=0.0, head_dropout=0.0))
    run = build.training(config, weights=False)
    state = run.new_state()
    before = jax.device_get(state.params)  # the step donates the state
    new_state, metrics = run.train_step(state, run.teacher_variables(random=True), batch)
    updates[k] = jax.tree.map(lambda a, b: a - np.asarray(b), before, new_state.params)
    losses[k] = float(metrics["loss"])
  out = jax.jit(lambda images: run.model.apply({"params": before}, images, train=False))(
    batch["image"] / np.float32(255)
  )
  assert out["logits"].shape[1:3] == (16, 16)
  expected = cross_entropy(resize_bilinear(out["logits"], (64, 64)), batch["label"])
  assert losses[2] == pytest.approx(float(expected), rel=1e-5)
  for k in (2,):
    assert losses[k] == pytest.approx(losses[1], rel=1e-6)
    for path, got in traverse_util.flatten_dict(updates[k], sep="/").items():
      want = traverse_util.flatten_dict(updates[1], sep="/")[path]
      np.testing.assert_allclose(
        got, want, rtol=0, atol=1e-6 * max(1, np.abs(want).max()), err_msg=path
      )
  config.update(batch_size=3)
  with pytest.raises(UserError, match="grad_accum_steps=2: the batch of 3 must split"):
    build.training(config, weights=False)
