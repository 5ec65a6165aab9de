"""Preemption and failure with several processes on 127.0.0.1 (CPU devices, gloo):
SIGTERM to one process saves one step everywhere; a damaged checkpoint is passed by
every process together; a killed process stops the other. (In a file of its own so
that the test runs beside test_distributed.py's on the other pytest worker.)"""

import signal
import time

import numpy as np
import pytest
from multiprocess import cityscapes_tree, two_processes
from runs import stop

from transkd_jax.logs import read_metrics


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  return cityscapes_tree(tmp_path_factory)


def test_sigterm_saves_one_step_everywhere_a_damaged_one_is_passed_together_and_a_kill_stops_both(
  tmp_path, data_root, compile_cache
):
  """SIGTERM to one process: both save the same step and exit 0. Then that newest
  checkpoint is damaged (a truncated file): both processes of the restarted run fall
  back to the previous checkpoint together and retrace the steps from there to the
  newest with the same losses, to float precision (the same parameters and batches).
  Then process 0 (the coordinator: the worse case) is killed: process 1 stops with an
  error instead of hanging.

  (Placing a teacher's weights uses the same global-array path as the student's state:
  test_build, test_bench_compile.)"""
  procs = two_processes(tmp_path, data_root, compile_cache, 2, first_step=3, checkpoint_every=2)
  try:
    procs[1].send_signal(signal.SIGTERM)  # preemption notice to one host only
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
  finally:
    stop(procs)
  ckpt_dir = tmp_path / "checkpoints"
  steps = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
  newest, previous = steps[-1], steps[-2]
  assert newest >= 3 and f"preempted: step {newest}" in outs[0]
  # Both processes' data-iterator states are in that one checkpoint.
  data = (ckpt_dir / str(newest) / "data").iterdir()
  assert sorted(q.name for q in data if q.suffix == ".json") == [
    "process_0-of-2.json",
    "process_1-of-2.json",
  ]
  files = [f for f in (ckpt_dir / str(newest) / "state").rglob("*") if f.is_file()]
  largest = max(files, key=lambda f: f.stat().st_size)
  largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
  straight = {r["step"]: r["loss"] for r in read_metrics(str(tmp_path)) if r["split"] == "train"}

  # Restarted without further saves (none in flight when a process is killed).
  procs = two_processes(
    tmp_path, data_root, compile_cache, 3, first_step=newest + 2, checkpoint_every=100000
  )
  try:
    procs[0].send_signal(signal.SIGKILL)
    start = time.time()
    survivor, _ = procs[1].communicate(timeout=120)
    assert procs[1].returncode != 0, survivor[-2000:]
    assert time.time() - start < 60
    # Either the step's collective loses its peer, or the coordination service misses
    # the dead process's heartbeats; both name what happened.
    causes = (
      "Connection reset by peer",
      "Connection closed by peer",
      "another task died",
      "unhealthy",
      "heartbeat",
    )
    assert any(c in survivor for c in causes), survivor[-3000:]
    out = procs[0].communicate(timeout=60)[0]
  finally:
    stop(procs)
  assert f"checkpoints/{newest} cannot be restored" in out
  assert f"resumed from {tmp_path}/checkpoints/{previous}" in out
  assert (ckpt_dir / f"{newest}.damaged").is_dir()
  rows = [r for r in read_metrics(str(tmp_path)) if r["split"] == "train"]
  again = {r["step"]: r["loss"] for r in rows[len(straight) :]}
  retraced = range(previous + 1, newest + 1)
  assert min(again) == previous + 1 and all(s in again for s in retraced)
  np.testing.assert_allclose(
    [again[s] for s in retraced], [straight[s] for s in retraced], rtol=1e-6
  )
