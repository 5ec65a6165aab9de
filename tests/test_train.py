"""Training pieces: the sharded step, the optimiser schedule, checkpoints."""

import os
import pathlib
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import json
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from transkd_jax import checkpoint as ckpt_lib
from transkd_jax import sharding
from transkd_jax.errors import UserError
from transkd_jax.optim import make_optimizer, make_schedule

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_sharded_step_equals_single_device():
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip())
  result = subprocess.run([sys.executable, str(REPO / "tests" / "sharded_step_check.py")],
                          capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  for name in ("dp", "fsdp"):
    assert out[name]["max_param_diff"] < 1e-6, out
    np.testing.assert_allclose(out[name]["losses"], out["losses"], rtol=1e-5)
  assert out["fsdp"]["fc1_spec"] != "P()"  # parameters really were split along "model"


def test_schedule_is_linear_decay_with_optional_warmup():
  opt = ml_collections.ConfigDict({"lr": 1.0})
  schedule = make_schedule(opt, 10)
  np.testing.assert_allclose([schedule(s) for s in (0, 5, 10)], [1.0, 0.5, 0.0], atol=1e-7)
  opt.warmup_steps = 2
  schedule = make_schedule(opt, 10)
  np.testing.assert_allclose([schedule(s) for s in (0, 1, 2, 6, 10)],
                             [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-7)
  with pytest.raises(ValueError, match="warmup_steps"):
    make_schedule(ml_collections.ConfigDict({"lr": 1.0, "warmup_steps": 10}), 10)


def test_no_decay_mask_spares_vectors_only():
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  for flag, expect_b in ((False, 0.9), (True, 1.0)):
    opt = ml_collections.ConfigDict({"lr": 1.0, "weight_decay": 0.1,
                                     "no_decay_norms_biases": flag})
    tx, _ = make_optimizer(opt, 100)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    new = jax.tree.map(lambda p, u: p + u, params, updates)
    np.testing.assert_allclose(new["w"], 0.9, rtol=1e-6)
    np.testing.assert_allclose(new["b"], expect_b, rtol=1e-6)


def test_mesh_shape_errors_name_the_key():
  with pytest.raises(ValueError, match="config.mesh_shape"):
    sharding.make_mesh((3, -1))
  with pytest.raises(ValueError, match="config.mesh_shape"):
    sharding.make_mesh((-1, -1))


def _iterator():
  ds = grain.MapDataset.range(100).shuffle(seed=3).map(lambda i: {"x": np.int64(i)}).batch(2)
  return iter(ds)


def test_checkpoints_restore_state_and_data_and_fall_back(tmp_path):
  config = ml_collections.ConfigDict({"a": 1})
  ckpts = ckpt_lib.RunCheckpoints(str(tmp_path), keep=2, async_save=True)
  it = _iterator()
  state = {"step": jnp.asarray(0), "w": jnp.zeros(3)}
  seen = []
  for step in range(1, 6):
    seen.append(next(it)["x"].tolist())
    state = {"step": jnp.asarray(step), "w": state["w"] + 1}
    metrics = {"val_miou": 0.9} if step == 2 else ({"val_miou": 0.1} if step == 4 else None)
    ckpts.save(step, state, it, config, metrics=metrics, force=True)
  ckpts.close()
  expected_next = next(it)["x"].tolist()
  # Latest two (4, 5) and the best by val_miou (2) are kept.
  ckpts = ckpt_lib.RunCheckpoints(str(tmp_path), keep=2)
  assert ckpts.steps() == [2, 4, 5] and ckpts.best_step() == 2
  abstract = jax.eval_shape(lambda: state)
  fresh = _iterator()
  restored, step = ckpts.restore(abstract, fresh)
  assert step == 5 and float(restored["w"][0]) == 5.0
  assert next(fresh)["x"].tolist() == expected_next  # the data stream resumes exactly
  # A damaged latest checkpoint: restore falls back to the previous one, saying so.
  for f in (tmp_path / "checkpoints" / "5" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  restored, step = ckpts.restore(abstract, _iterator())
  assert step == 4 and float(restored["w"][0]) == 4.0
  saved_config = json.loads((tmp_path / "checkpoints" / "4" / "config" / "metadata").read_text())
  assert saved_config == {"a": 1}


def test_model_variables_from_converted_dir_and_errors(tmp_path):
  tree = {"params": {"w": np.ones((2, 3), np.float32)}, "batch_stats": {}}
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "conv", tree)
  variables = ckpt_lib.restore_model_variables(str(tmp_path / "conv"), "config.teacher.checkpoint")
  np.testing.assert_array_equal(variables["params"]["w"], tree["params"]["w"])
  with pytest.raises(UserError, match="config.teacher.checkpoint=.*no such directory"):
    ckpt_lib.restore_model_variables(str(tmp_path / "nope"), "config.teacher.checkpoint")
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="cannot be read as an Orbax checkpoint"):
    ckpt_lib.restore_model_variables(str(tmp_path / "empty"), "config.teacher.checkpoint")
  with pytest.raises(UserError, match=r"shape of \['params'\]\['w'\]: \(2, 3\), expected \(3, 3\)"):
    ckpt_lib.check_variables(variables, {"params": {"w": np.zeros((3, 3))}, "batch_stats": {}},
                             "config.teacher.checkpoint", "SegFormer-B2")


def test_full_resolution_labels_get_upsampled_logits_in_the_ce():
  """mmseg protocol: the CE compares logits upsampled bilinearly to full-size labels."""
  from transkd_jax.distill import Distiller, loss_settings
  from transkd_jax.distill.losses import cross_entropy
  from transkd_jax.models.resize import resize_bilinear
  from transkd_jax.train_step import init_state, make_train_step
  from transkd_jax.models import MiTVariant
  tiny = MiTVariant((8, 16, 24, 32), (1, 1, 1, 1), (1, 1, 1, 1), 16)
  model = Distiller("student", tiny, tiny, num_classes=5)
  tx, schedule = make_optimizer(ml_collections.ConfigDict({"lr": 1e-3}), 10)
  state = jax.jit(lambda: init_state(model, tx, (64, 64), seed=0))()
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.uniform(size=(2, 64, 64, 3)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 5, (2, 64, 64)), jnp.int32)}
  step = jax.jit(make_train_step(model, None, "student", loss_settings("student", None), tx,
                                 schedule, seed=0))
  _, metrics = step(state, None, batch)
  out, _ = jax.jit(lambda images: model.apply(
      {"params": state.params, "batch_stats": state.batch_stats}, images, train=True,
      rngs={"dropout": jax.random.fold_in(jax.random.key(0), 0)},
      mutable=["batch_stats"]))(batch["image"])
  assert out["logits"].shape[1:3] == (16, 16)
  expected = cross_entropy(resize_bilinear(out["logits"], (64, 64)), batch["label"])
  np.testing.assert_allclose(metrics["ce"], expected, rtol=1e-5)
