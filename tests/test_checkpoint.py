"""Checkpoints: state and data iterator restored exactly, fallback past a damaged step,
the best kept by metric, model weights read from converted directories, errors named."""

import json
import pathlib

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from transkd_jax import checkpoint as ckpt_lib
from transkd_jax.errors import UserError


def _iterator():
  ds = grain.MapDataset.range(100).shuffle(seed=3).map(lambda i: {"x": np.int64(i)}).batch(2)
  return iter(ds)


def test_saving_leaves_the_preemption_sync_counter_to_the_train_loop(tmp_path, monkeypatch):
  """JAX's preemption sync manager keeps one call counter per process, the last call's.
  Orbax asks it with the step number as it saves (also from its finalize thread); between
  the train loop's own calls that set the counter back, and a SIGTERM then could agree
  on a sync point no later call reached: two processes trained on (test_preemption,
  about one run in four)."""
  from jax.experimental import multihost_utils

  calls = []
  monkeypatch.setattr(
    multihost_utils, "reached_preemption_sync_point", lambda step: calls.append(step) or False
  )
  ckpts = ckpt_lib.RunCheckpoints(str(tmp_path), async_save=True)
  state = {"w": jnp.zeros(3)}
  for step in (2, 4):
    ckpts.save(step, state, _iterator(), ml_collections.ConfigDict({"a": 1}), force=True)
  ckpts.close()
  assert ckpts.steps() == [2, 4] and calls == []


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
  # A damaged latest checkpoint (a truncated data file): restore falls back to the
  # previous one, saying so, and sets the damaged one aside so a later save of step 5
  # does not collide with it.
  data_files = [f for f in (tmp_path / "checkpoints" / "5" / "state").rglob("*") if f.is_file()]
  largest = max(data_files, key=lambda f: f.stat().st_size)
  largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
  ckpts = ckpt_lib.RunCheckpoints(str(tmp_path), keep=2)
  restored, step = ckpts.restore(abstract, _iterator())
  assert step == 4 and float(restored["w"][0]) == 4.0
  assert ckpts.steps() == [2, 4] and (tmp_path / "checkpoints" / "5.damaged").is_dir()
  ckpts.save(5, state, it, config, force=True)
  ckpts.wait()
  assert ckpts.steps() == [2, 4, 5]
  saved_config = json.loads((tmp_path / "checkpoints" / "4" / "config" / "metadata").read_text())
  assert saved_config == {"a": 1}
  # When no checkpoint can be read, the run stops: it is never started afresh over them.
  for step in (2, 4, 5):
    for f in (tmp_path / "checkpoints" / str(step) / "state").rglob("*"):
      if f.is_file():
        f.write_bytes(b"garbage")
  ckpts.close()
  ckpts = ckpt_lib.RunCheckpoints(str(tmp_path), keep=2)
  with pytest.raises(UserError, match=r"none of the checkpoints in .* \(steps 2, 4, 5\)"):
    ckpts.restore(abstract, _iterator())
  ckpts.close()


def test_a_transient_read_error_is_retried_and_never_taken_for_damage(tmp_path, monkeypatch):
  config = ml_collections.ConfigDict({"a": 1})
  ckpts = ckpt_lib.RunCheckpoints(str(tmp_path), async_save=False)
  for step in (1, 2):
    ckpts.save(step, {"w": jnp.full(3, float(step))}, None, config, force=True)
  abstract = jax.eval_shape(lambda: {"w": jnp.zeros(3)})
  read = ckpts._read_once
  failures = {"left": 2}

  def flaky(*args):
    if failures["left"]:
      failures["left"] -= 1
      raise ValueError("OUT_OF_RANGE reading gs://b/r: 503 Service Unavailable")
    return read(*args)

  monkeypatch.setattr(ckpts, "_read_once", flaky)
  waits = []
  restored, step = ckpts.restore(abstract, sleep=waits.append)
  assert step == 2 and float(restored["w"][0]) == 2.0  # the newest, after two tries
  assert waits == [ckpt_lib.READ_RETRY_WAIT, 2 * ckpt_lib.READ_RETRY_WAIT]
  # Storage that keeps failing: the run stops, naming it, and does not fall back to 1.
  failures["left"] = 100
  waits.clear()
  with pytest.raises(ckpt_lib.TransientReadError, match=r"checkpoints/2 failed 5 times"):
    ckpts.restore(abstract, sleep=waits.append)
  assert len(waits) == ckpt_lib.READ_TRIES - 1
  assert ckpt_lib.transient(OSError(104, "Connection reset by peer"))
  assert ckpt_lib.transient(TimeoutError())
  assert not ckpt_lib.transient(ValueError("Error reading: DATA_LOSS: truncated chunk"))
  assert not ckpt_lib.transient(ValueError("RESOURCE_EXHAUSTED: Out of memory allocating"))
  assert ckpt_lib.damage(ValueError("Error reading: DATA_LOSS: truncated chunk"))

  # Memory running out is not damage either: the run stops, no fall back to step 1.
  def out_of_memory(*args):
    raise MemoryError("cannot allocate")

  monkeypatch.setattr(ckpts, "_read_once", out_of_memory)
  with pytest.raises(MemoryError):
    ckpts.restore(abstract, sleep=waits.append)
  ckpts.close()


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
    ckpt_lib.check_variables(
      variables,
      {"params": {"w": np.zeros((3, 3))}, "batch_stats": {}},
      "config.teacher.checkpoint",
      "SegFormer-B2",
    )


# Written by the code before the house change (TransKD-Base, tiny rows, 2 steps): a run's
# checkpoint must keep loading, and every model and training-time module keep its
# parameter names and shapes (tests/data/param_trees.json, full-size rows).
DATA = pathlib.Path(__file__).resolve().parent / "data"


def _listing(tree):
  return [
    f"{jax.tree_util.keystr(p)} {tuple(x.shape)} {x.dtype}"
    for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  ]


def test_parameter_trees_keep_their_names_and_shapes():
  from transkd_jax.distill import METHODS, Distiller
  from transkd_jax.models import archs

  expected = json.loads((DATA / "param_trees.json").read_text())
  images = jnp.zeros((1, 64, 64, 3))
  got = {}
  for arch, row in archs.ARCHS.items():
    for variant in row.variants:
      model = archs.build(arch, variant, 19)
      got[f"{arch}-{variant}"] = _listing(jax.eval_shape(model.init, jax.random.key(0), images))
  # The modules' trees follow the pair's stage widths only: the PVTv2 B2 -> B0 rows of the
  # file equal the SegFormer pair's (same widths), so that pair is not traced again, and
  # methods without modules (student, kd) add nothing to trace.
  for ta, tv, sa, sv in (("segformer", "b2", "segformer", "b0"), ("segformer", "b2", "lvt", "lvt")):
    for name, method in METHODS.items():
      if name in ("teacher", "student", "kd"):
        continue
      d = Distiller(method, sv, tv, arch=sa, teacher_arch=ta, num_classes=19)
      tree = jax.eval_shape(lambda d=d: d.init(jax.random.key(0), images, train=False))
      got[f"{ta}-{tv}>{sa}-{sv}:{name}"] = _listing(
        {c: {k: t for k, t in tree[c].items() if k != "student"} for c in tree}
      )
  for key in [k for k in expected if k.startswith("pvtv2-b2>pvtv2-b0:")]:
    assert expected[key] == expected[key.replace("pvtv2-b2>pvtv2-b0", "segformer-b2>segformer-b0")]
  for key in [k for k in expected if k.endswith((":student", ":kd"))]:
    assert expected[key] == [], key
  traced = {
    k for k in expected if not k.startswith("pvtv2-b2>") and not k.endswith((":student", ":kd"))
  }
  assert sorted(got) == sorted(traced)
  for key in traced:
    assert got[key] == expected[key], key


def test_a_run_checkpoint_written_before_the_house_change_restores(tmp_path):
  import shutil

  import runs

  from transkd_jax import build

  workdir = tmp_path / "run"
  shutil.copytree(DATA / "run_before_house", workdir)
  config = runs.tiny_config(str(tmp_path / "data"), total_steps=2, method="transkd_base")
  config.distill.fusion_channels = 8
  run = build.training(config, weights=False)
  ckpts = ckpt_lib.RunCheckpoints(str(workdir))
  restored, step = ckpts.restore(run.abstract_state.as_dict())
  ckpts.close()
  assert step == 2 and int(restored["step"]) == 2
  assert _listing(restored) == _listing(run.abstract_state.as_dict())
  variables, source = build.read_model(
    str(workdir), "config.eval.checkpoint", "segformer", runs.TINY_STUDENT, 19
  )
  assert "step 2" in source
  assert _listing(variables["params"]) == _listing(restored["params"]["student"])
