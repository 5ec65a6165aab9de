"""The construction path: the method row and role resolved once, a teacher run that
stores its teacher as "teacher", the teacher read and checked before anything compiles,
and eval / predict weights from a run's workdir."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from runs import TINY_TEACHER, set_variant, tiny_config

from transkd_jax import build
from transkd_jax.distill import METHODS
from transkd_jax.errors import UserError
from transkd_jax.models import SegFormer
from transkd_jax.train import check_teacher, train


def test_a_distilling_run_holds_its_method_row_and_the_student(teacher_dir, data_root):
  config = tiny_config(data_root, method="transkd_gl")
  set_variant(config, "teacher", "b0")
  config.teacher.checkpoint = teacher_dir
  run = build.training(config)
  assert run.method is METHODS["transkd_gl"] and run.model.method is run.method
  assert set(run.abstract_state.params) == {"student", "fusion", "pea", "gl_mixer"}
  # The teacher's weights are the checkpoint's, placed on the mesh.
  placed = jax.tree.leaves(run.teacher.variables)
  assert all(x.sharding.mesh == run.mesh for x in placed)
  # Nothing recorded beside it: the teacher gets the student's normalisation.
  assert run.teacher.input_norm == "unit"
  assert "data.transforms='reference'" in run.teacher.input_norm_source
  # The sanity check before distilling scores it on the first check_images val images.
  config.teacher.check_images = 3
  checked = check_teacher(run)
  assert checked["images"] == 3 and 0 <= checked["miou"] <= 1
  config.teacher.check_images = 0
  assert check_teacher(run) is None


def test_a_teacher_run_trains_and_serves_its_teacher(tmp_path, data_root):
  config = tiny_config(data_root, method="teacher", total_steps=2)
  run = build.training(config)
  assert run.teacher is None and run.teacher_variables() is None
  assert set(run.abstract_state.params) == {"teacher"}
  assert run.model.variant == TINY_TEACHER
  summary = train(config, str(tmp_path))
  assert summary["step"] == 2
  config.eval.checkpoint = ""
  served = build.serving(config, str(tmp_path))
  assert served.variant == TINY_TEACHER and "step 2" in served.source
  params = jax.eval_shape(
    SegFormer(TINY_TEACHER, 19).init, jax.random.key(0), jnp.zeros((1, 64, 64, 3))
  )["params"]
  assert jax.tree.map(np.shape, served.variables["params"]) == jax.tree.map(np.shape, params)


def test_a_missing_or_mismatched_teacher_is_named_before_compiling(tmp_path):
  config = tiny_config(method="transkd_base")
  with pytest.raises(
    UserError, match="method 'transkd_base' distils from a teacher: set config.teacher.checkpoint"
  ):
    build.training(config)
  config.teacher.checkpoint = str(tmp_path / "nope")
  with pytest.raises(UserError, match="config.teacher.checkpoint=.*no such directory"):
    build.training(config)
  # A B0 checkpoint where the config says the teacher is the tiny row.
  wrong = SegFormer("b0", 19)
  variables = jax.eval_shape(wrong.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), variables)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "b0", variables)
  config.teacher.checkpoint = str(tmp_path / "b0")
  with pytest.raises(
    UserError,
    match=r"config.teacher.checkpoint=.*b0 does not fit "
    r"SegFormer-.* with 19 classes.*shape of",
  ):
    build.training(config)


def test_a_student_from_converted_weights_starts_from_them(tmp_path):
  model = SegFormer("b0", 19)
  variables = jax.jit(model.init)(jax.random.key(9), jnp.zeros((1, 64, 64, 3)))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(
      tmp_path / "init", {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    )
  config = tiny_config(method="student")
  set_variant(config, "student", "b0")
  config.student.init = str(tmp_path / "init")
  state = build.training(config).new_state()
  for a, b in zip(jax.tree.leaves(state.params["student"]), jax.tree.leaves(variables["params"])):
    np.testing.assert_array_equal(a, b)


def test_a_pvtv2_teacher_distils_into_an_lvt_student(tmp_path, data_root):
  """Across families, from a teacher whose checkpoint (as convert writes a PVTv2's) holds
  an empty batch_stats: built, checked, and one step trains the student and its modules."""
  from runs import TINY_LVT, TINY_PVT

  from transkd_jax.models import archs

  teacher = archs.build("pvtv2", TINY_PVT, 19)
  variables = jax.jit(teacher.init)(jax.random.key(2), jnp.zeros((1, 64, 64, 3)))
  assert set(variables) == {"params"}
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "pvt", {"params": variables["params"], "batch_stats": {}})
  config = tiny_config(data_root, method="transkd_base")
  config.teacher.arch, config.student.arch = "pvtv2", "lvt"
  set_variant(config, "teacher", TINY_PVT)
  set_variant(config, "student", TINY_LVT)
  config.teacher.checkpoint = str(tmp_path / "pvt")
  run = build.training(config)
  assert set(run.teacher.variables) == {"params"}
  state = run.new_state()
  before = jax.device_get(state.params)  # the step donates the state
  spec = build.batch_spec(config)
  batch = {k: jnp.ones(s.shape, s.dtype) for k, s in spec.items()}
  new_state, metrics = run.train_step(state, run.teacher_variables(), batch)
  assert {"ce", "hcl", "pea"} <= set(metrics) and np.isfinite(float(metrics["loss"]))
  moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), before, jax.device_get(new_state.params))
  assert all(any(jax.tree.leaves(moved[k])) for k in ("student", "fusion", "pea"))
