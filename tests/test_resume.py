"""A workdir holds one run: another run's checkpoints stop the start, naming each key
that differs, and change nothing; safe keys (a longer run) resume. (Resuming a longer
run end to end: tests/test_train.py.)"""

import jax
import jax.numpy as jnp
import pytest

from transkd_jax import checkpoint as ckpt_lib
from transkd_jax import resume
from transkd_jax.config import base_config
from transkd_jax.errors import UserError


def _listing(root):
  return sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*"))


@pytest.fixture
def workdir(tmp_path):
  """A workdir holding one checkpoint of a B0-student run."""
  config = base_config()
  config.method = "student"
  ckpts = ckpt_lib.RunCheckpoints(str(tmp_path), async_save=False)
  ckpts.save(10, {"w": jnp.zeros(3)}, None, config, force=True)
  ckpts.close()
  return tmp_path


def _config(**changes):
  config = base_config()
  config.method = "student"
  for key, value in changes.items():
    node = config
    *parents, last = key.split(".")
    for part in parents:
      node = node[part]
    node[last] = value
  return config


@pytest.mark.parametrize(
  "changes, named",
  [
    ({"student.variant": "b1"}, "student.variant: 'b0' in the saved run, 'b1' now"),
    ({"method": "transkd_base"}, "method: 'student' in the saved run, 'transkd_base' now"),
    (
      {"student.variant": "b1", "optimizer.lr": 1e-3, "total_steps": 5},
      "optimizer.lr: 6e-05 in the saved run, 0.001 now\n  student.variant",
    ),
  ],
)
def test_another_runs_checkpoints_stop_the_start_and_change_nothing(workdir, changes, named):
  before = _listing(workdir)
  with pytest.raises(UserError) as error:
    resume.check(str(workdir), _config(**changes))
  message = str(error.value)
  assert f"{workdir}/checkpoints holds the checkpoints of another run" in message
  assert named in message
  assert "total_steps" not in message  # a safe key is not among the refused
  assert "another --workdir" in message and "--config.resume_allow=" in message
  assert _listing(workdir) == before


def test_safe_and_allowed_keys_resume(workdir, capsys):
  resume.check(str(workdir), _config(total_steps=10**9, log_every=7))
  out = capsys.readouterr().out
  assert "changed keys: log_every 50 -> 7, total_steps" in out
  resume.check(str(workdir), _config(**{"data.root": "/moved", "resume_allow": "data.root"}))
  resume.check(str(workdir), _config(**{"data.root": "/moved", "resume_allow": "data"}))
  with pytest.raises(UserError, match="data.root: '' in the saved run, '/moved' now"):
    resume.check(str(workdir), _config(**{"data.root": "/moved"}))
  with pytest.raises(UserError, match="config.resume_allow names data.rot, which the config"):
    resume.check(str(workdir), _config(**{"data.root": "/moved", "resume_allow": "data.rot"}))
  resume.check(str(workdir.parent / "empty"), _config(method="teacher"))  # no checkpoints


def test_saved_tensor_shapes_are_checked(workdir):
  saved = ckpt_lib.RunCheckpoints(str(workdir)).saved_shapes()
  assert saved == {"w": (3,)}
  resume.check_shapes(str(workdir), saved, jax.eval_shape(lambda: {"w": jnp.zeros(3)}))
  with pytest.raises(UserError) as error:
    resume.check_shapes(
      str(workdir), saved, jax.eval_shape(lambda: {"w": jnp.zeros(4), "b": jnp.zeros(2)})
    )
  assert "  b: absent in the checkpoint, (2,) now\n  w: (3,) in the checkpoint, (4,) now" in str(
    error.value
  )
