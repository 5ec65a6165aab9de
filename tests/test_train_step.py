"""The train step: sharded over 8 devices equals one device; full-resolution labels get
upsampled logits in the cross-entropy."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
from runs import REPO, tiny_config

from transkd_jax import build
from transkd_jax.distill.losses import cross_entropy
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


def test_full_resolution_labels_get_upsampled_logits_in_the_ce():
  """mmseg protocol: the CE compares logits upsampled bilinearly to full-size labels."""
  config = tiny_config(method="student", num_classes=5, image_size=(64, 64))
  config.optimizer.lr = 1e-3
  run = build.training(config)
  state = run.new_state()
  rng = np.random.default_rng(0)
  batch = {
    "image": rng.uniform(size=(2, 64, 64, 3)).astype(np.float32),
    "label": rng.integers(0, 5, (2, 64, 64)).astype(np.int32),
  }
  _, metrics = run.train_step(run.new_state(), None, batch)
  out, _ = jax.jit(
    lambda images: run.model.apply(
      {"params": state.params, "batch_stats": state.batch_stats},
      images,
      train=True,
      rngs={"dropout": jax.random.fold_in(jax.random.key(config.seed), 0)},
      mutable=["batch_stats"],
    )
  )(batch["image"])
  assert out["logits"].shape[1:3] == (16, 16)
  expected = cross_entropy(resize_bilinear(out["logits"], (64, 64)), batch["label"])
  np.testing.assert_allclose(metrics["ce"], expected, rtol=1e-5)
