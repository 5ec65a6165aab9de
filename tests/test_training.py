"""Training end to end on generated data: every method learns, runs resume exactly
after SIGKILL, SIGTERM saves, and a bad teacher fails before compiling."""

import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from transkd_jax.distill import METHODS
from transkd_jax.logs import read_metrics
from transkd_jax.models import SegFormer
from transkd_jax.train import train

from runs import SYNTHETIC, env as _env, final_params as _final_params, main as _main
from runs import overrides as _overrides, synthetic_config, wait_for as _wait_for


def test_sigkill_then_restart_ends_bit_equal(tmp_path, data_root, compile_cache):
  env = _env(compile_cache)
  args = ["--mode=train", SYNTHETIC, *_overrides(data_root, total_steps=10, checkpoint_every=2)]
  straight = _main([*args, f"--workdir={tmp_path / 'a'}"], env)
  out, _ = straight.communicate(timeout=600)
  assert straight.returncode == 0, out[-3000:]

  killed = _main([*args, f"--workdir={tmp_path / 'b'}"], env)
  ckpt_dir = tmp_path / "b" / "checkpoints"
  _wait_for(lambda: (ckpt_dir / "4").is_dir() and any(
      r["step"] >= 5 for r in read_metrics(str(tmp_path / "b"))), killed)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  restarted = _main([*args, f"--workdir={tmp_path / 'b'}"], env)
  out, _ = restarted.communicate(timeout=600)
  assert restarted.returncode == 0, out[-3000:]
  assert "resumed from" in out
  a, b = _final_params(tmp_path / "a", 10), _final_params(tmp_path / "b", 10)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_sigterm_saves_and_exits_cleanly(tmp_path, data_root, compile_cache):
  env = _env(compile_cache)
  proc = _main(["--mode=train", SYNTHETIC, f"--workdir={tmp_path}",
                *_overrides(data_root, total_steps=100000, checkpoint_every=100000)], env)
  _wait_for(lambda: any(r["step"] >= 2 for r in read_metrics(str(tmp_path))), proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  assert "SIGTERM: saved step" in out
  steps = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
  assert steps and max(steps) >= 2


def test_missing_or_mismatched_teacher_fails_before_compiling(tmp_path, data_root):
  env = _env(str(tmp_path / "cache"))
  base = ["--mode=train", SYNTHETIC, f"--workdir={tmp_path / 'run'}",
          "--config.method=transkd_base", *_overrides(data_root, total_steps=2)]
  out, _ = _main(base, env).communicate(timeout=300)
  assert "error: method 'transkd_base' distils from a teacher: set config.teacher.checkpoint" in out
  missing = _main([*base, f"--config.teacher.checkpoint={tmp_path / 'nope'}"], env)
  out, _ = missing.communicate(timeout=300)
  assert missing.returncode == 2 and "no such directory" in out and "Traceback" not in out
  # A B0 checkpoint where the config says the teacher is a B2.
  wrong = SegFormer("b0", 19)
  variables = jax.eval_shape(wrong.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), variables)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "b0", variables)
  start = time.time()
  mismatched = _main([*base, f"--config.teacher.checkpoint={tmp_path / 'b0'}"], env)
  out, _ = mismatched.communicate(timeout=300)
  assert mismatched.returncode == 2, out[-2000:]
  assert "config.teacher.checkpoint" in out and "does not fit SegFormer-B2" in out
  assert "shape of" in out and time.time() - start < 60


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_few_steps_on_generated_data_lower_the_loss(method, tmp_path, data_root, teacher_dir):
  config = synthetic_config()
  config.image_size = (64, 128)
  config.batch_size = 2
  config.total_steps = 6
  config.log_every = 1
  config.eval_every = 0
  config.checkpoint_every = 0
  config.optimizer.warmup_steps = 0
  config.optimizer.lr = 1e-3
  config.method = method
  config.teacher.variant = "b0"
  config.teacher.checkpoint = teacher_dir
  config.data.update({"root": data_root, "num_train": 8, "num_val": 4,
                      "generated_size": (64, 128)})
  summary = train(config, str(tmp_path))
  assert summary["step"] == 6
  rows = [r for r in read_metrics(str(tmp_path)) if r["split"] == "train"]
  losses = [r["loss"] for r in rows]
  assert len(losses) == 6 and all(np.isfinite(losses))
  expected = {"student": [], "kd": ["kd"], "cwd": ["cwd"], "fitnet": ["fitnet"],
              "reviewkd": ["hcl"]}.get(method, ["hcl", "pea"])
  assert all(term in rows[0] for term in ["ce", *expected])
  assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses
