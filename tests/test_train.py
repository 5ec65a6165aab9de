"""Training end to end on generated data, through ``python -m transkd_jax.main``: a run
(no --mode: training is the default) lowers its loss and leaves its checkpoint, and the
same run killed and restarted ends bit-equal; SIGTERM at any point saves the last completed
step."""

import signal

import jax
import numpy as np
import pytest
from runs import TINY_SYNTHETIC
from runs import env as _env
from runs import final_params as _final_params
from runs import main as _main
from runs import overrides as _overrides
from runs import wait_for as _wait_for

from transkd_jax.logs import read_metrics


def _args(data_root):
  """One 12-step run of the student, each step's batch of 2 as 2 accumulated micro-batches
  (config.grad_accum_steps), so the killed-and-restarted run checks that accumulation
  resumes exactly too (its equality to one large batch: test_train_step.py). Every run
  here compiles the same program (cached).

  (Distillation end to end through main: test_preemption's SIGTERM test and the
  README's first command, which CI runs; one-batch steps resumed: test_distributed.)"""
  return [
    TINY_SYNTHETIC,
    *_overrides(
      data_root,
      total_steps=12,
      checkpoint_every=4,
      method="student",
      grad_accum_steps=2,
      **{"optimizer.lr": 1e-2, "optimizer.decay_steps": 12},
    ),
  ]


def test_training_is_the_default_mode_lowers_the_loss_and_a_killed_run_resumes_bit_equal(
  tmp_path, data_root, compile_cache
):
  env = _env(compile_cache)
  args = _args(data_root)
  straight = _main(
    [
      *args,
      f"--workdir={tmp_path / 'a'}",
      "--config.profile_steps=(2,3)",
      "--config.count_flops=True",
    ],
    env,
  )  # no --mode: it trains
  out, _ = straight.communicate(timeout=600)
  assert straight.returncode == 0, out[-3000:]
  assert "step 12/12: loss" in out and "%|" not in out  # a log file gets lines, not a bar
  assert "compiled the train step in" in out and "data wait" in out
  assert (tmp_path / "a" / "checkpoints" / "12").is_dir()
  assert list((tmp_path / "a" / "profile").rglob("*.xplane.pb"))  # config.profile_steps
  rows = [r for r in read_metrics(str(tmp_path / "a")) if r["split"] == "train"]
  assert [r["step"] for r in rows] == list(range(1, 13))
  assert {"ce", "loss", "lr", "grad_norm", "imgs_per_s", "data_wait", "tflops_per_device"} <= set(
    rows[0]
  )
  assert all(0 <= r["data_wait"] < 1 and r["tflops_per_device"] > 0 for r in rows)
  losses = [r["loss"] for r in rows]
  assert all(np.isfinite(losses)) and np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4]), losses
  a = _final_params(tmp_path / "a", 12)
  assert {"student"} == set(a)

  killed = _main([*args, f"--workdir={tmp_path / 'b'}"], env)
  ckpt_dir = tmp_path / "b" / "checkpoints"
  _wait_for(
    lambda: (
      (ckpt_dir / "4").is_dir() and any(r["step"] >= 5 for r in read_metrics(str(tmp_path / "b")))
    ),
    killed,
  )
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  restarted = _main([*args, f"--workdir={tmp_path / 'b'}"], env)
  out, _ = restarted.communicate(timeout=600)
  assert restarted.returncode == 0, out[-3000:]
  assert "resumed from" in out
  b = _final_params(tmp_path / "b", 12)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_a_non_finite_loss_is_named_at_its_first_step():
  """The loop fetches metrics only at log and save steps; the check names the first bad one."""
  from transkd_jax.train import TrainingDiverged, check_finite

  rows = [
    {"loss": 1.5, "lr": 0.1},
    {"loss": float("nan"), "lr": 0.1},
    {"loss": float("inf"), "lr": 0.1},
  ]
  check_finite(rows[:1], 7)
  with pytest.raises(
    TrainingDiverged,
    match=r"the loss became nan at step 8 \(loss=nan, "
    r"lr=0.1\); no non-finite state was saved; last "
    r"good checkpoint: none",
  ):
    check_finite(rows, 7)


def test_sigterm_at_any_point_keeps_the_last_completed_step_and_a_longer_run_resumes(
  tmp_path, data_root, monkeypatch, capsys
):
  """SIGTERM while the step compiles stops at once (nothing new to save); during
  validation it stops the validation and saves the step unscored (a final validation
  cut so runs on restart); after a step it saves that step. Each exits cleanly and says
  so in WORKDIR/run_status.json, and each restart goes on from the saved step, also
  with a longer total_steps (a key that may change on resume)."""
  import os
  import time

  from runs import tiny_config

  from transkd_jax import train as train_lib
  from transkd_jax.storage import read_json

  def config(total_steps):
    out = tiny_config(data_root, method="student", total_steps=total_steps, eval_every=2)
    out.optimizer.decay_steps = 8  # one program for every length
    return out

  def status():
    return read_json(str(tmp_path / "run_status.json"))

  def saved():
    return sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())

  compile_step = train_lib._compile

  def slow_compile(*args):  # a long compile (minutes on a TPU slice), signalled
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)  # the run stops without waiting for it

  monkeypatch.setattr(train_lib, "_compile", slow_compile)
  start = time.perf_counter()
  summary = train_lib.train(config(2), str(tmp_path))
  assert time.perf_counter() - start < 20 and summary["status"] == "preempted"
  assert summary["step"] == 0 and saved() == []
  assert status() == {"status": "preempted", "step": 0, "total_steps": 2}
  monkeypatch.setattr(train_lib, "_compile", compile_step)

  validate = train_lib.run_validation
  batches = []

  def signalled_validation(run, state, stop):
    calls = []

    def counting_stop():
      calls.append(1)
      batches.append(1)
      answer = stop()
      if len(calls) == 1:
        os.kill(os.getpid(), signal.SIGTERM)  # arrives during the first batch
      return answer

    return validate(run, state, stop=counting_stop)

  monkeypatch.setattr(train_lib, "run_validation", signalled_validation)
  summary = train_lib.train(config(2), str(tmp_path))
  out = capsys.readouterr().out
  assert "SIGTERM before the first step: step 0 is the last completed one (a fresh run" in out
  assert "SIGTERM during validation: saved step 2 (unscored)" in out
  assert summary["status"] == "preempted" and summary["step"] == 2 and "val" not in summary
  assert len(batches) == 2  # stopped before the second validation batch
  assert saved() == [2] and status()["status"] == "preempted"
  assert not [r for r in read_metrics(str(tmp_path)) if r["split"] == "val"]
  monkeypatch.setattr(train_lib, "run_validation", validate)

  # Made longer, it goes on from step 2; SIGTERM after step 3 saves the step it stops at.
  check = train_lib.check_finite

  def signal_after_step_3(rows, first_step, checkpoints=None):
    if first_step == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return check(rows, first_step, checkpoints)

  monkeypatch.setattr(train_lib, "check_finite", signal_after_step_3)
  summary = train_lib.train(config(6), str(tmp_path))
  out = capsys.readouterr().out
  assert "changed keys: total_steps 2 -> 6" in out
  assert summary["start_step"] == 2 and summary["status"] == "preempted"
  assert f"SIGTERM: saved step {summary['step']} to" in out and saved()[-1] == summary["step"]
  monkeypatch.setattr(train_lib, "check_finite", check)

  # On to 6; SIGTERM again during the final validation: step 6 saved unscored.
  monkeypatch.setattr(train_lib, "run_validation", signalled_validation)
  summary = train_lib.train(config(6), str(tmp_path))
  assert summary["step"] == 6 and summary["status"] == "preempted"
  assert "SIGTERM during validation: saved step 6" in capsys.readouterr().out
  # Started again, it runs that final validation, and the run is done.
  monkeypatch.setattr(train_lib, "run_validation", validate)
  summary = train_lib.train(config(6), str(tmp_path))
  assert summary["status"] == "done" and summary["start_step"] == 6 and summary["step"] == 6
  assert summary["val"]["images"] == 4
  assert [r["step"] for r in read_metrics(str(tmp_path)) if r["split"] == "val"][-1] == 6
  assert status() == {"status": "done", "step": 6, "total_steps": 6}


def test_a_failed_checkpoint_write_names_the_newest_complete_one():
  """A full disk (checked by hand on a small tmpfs: README's Long runs): the write's error
  stops the run with one line naming the newest complete checkpoint to resume from."""
  from transkd_jax import train as train_lib

  class Checkpoints:
    directory = "/runs/x/checkpoints"

    def latest_step(self):
      return 2

  with pytest.raises(train_lib.CheckpointWriteFailed) as error:
    with train_lib._checkpoint_writes(Checkpoints()):
      raise ValueError("RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']")
  message = str(error.value)
  assert "writing a checkpoint to /runs/x/checkpoints failed (ValueError: RESOURCE_EX" in message
  assert "No space left on device" in message
  assert "newest complete checkpoint is /runs/x/checkpoints/2" in message
  assert isinstance(error.value, train_lib.UserError)  # exit status 2, one line
