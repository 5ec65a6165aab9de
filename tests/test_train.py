"""Training end to end on generated data, through ``python -m transkd_jax.main``: a
TransKD-Base run (no --mode: training is the default) lowers its loss and leaves its
checkpoint; runs resume exactly after SIGKILL; SIGTERM saves."""

import signal

import jax
import numpy as np

from transkd_jax.logs import read_metrics

from runs import SYNTHETIC, env as _env, final_params as _final_params, main as _main
from runs import overrides as _overrides, wait_for as _wait_for


def test_transkd_base_trains_by_default_and_lowers_the_loss(tmp_path, data_root, compile_cache,
                                                           teacher_dir):
  args = [SYNTHETIC, f"--workdir={tmp_path}",
          *_overrides(data_root, total_steps=20, method="transkd_base", log_every=1,
                      **{"teacher.variant": "b0", "teacher.checkpoint": teacher_dir,
                         "optimizer.lr": 1e-3})]
  proc = _main(args, _env(compile_cache))
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-3000:]
  assert (tmp_path / "checkpoints" / "20").is_dir()
  rows = [r for r in read_metrics(str(tmp_path)) if r["split"] == "train"]
  assert [r["step"] for r in rows] == list(range(1, 21))
  assert {"ce", "hcl", "pea", "loss", "lr"} <= set(rows[0])
  losses = [r["loss"] for r in rows]
  assert all(np.isfinite(losses)) and np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4]), losses
  params = _final_params(tmp_path, 20)
  assert {"student", "fusion", "pea"} == set(params)  # the teacher is never checkpointed


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
