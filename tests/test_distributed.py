"""Several processes on 127.0.0.1 (CPU devices, gloo): the multi-host code path.

configs/cityscapes.py at a tiny size, 2 images per device: 2 processes x 2 devices
train with a global batch of 8 to the parameters of 1 process x 4 devices; a
checkpoint they write resumes in 1 process; a process that dies makes the
other stop with an error instead of hanging; SIGTERM to one process makes
both save the same step and exit cleanly.
"""

import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from runs import REPO, env, final_params, main, stop, wait_for

from transkd_jax import distributed
from transkd_jax.data import generated
from transkd_jax.logs import read_metrics

LAUNCH = REPO / "launch" / "local_multiprocess.sh"


_CLUSTER_VARIABLES = (
  "SLURM_NTASKS",
  "SLURM_JOB_ID",
  "TPU_WORKER_HOSTNAMES",
  "TPU_PROCESS_ADDRESSES",
)


@pytest.mark.parametrize(
  "mode,environment,expected",
  [
    # A Cloud TPU VM slice (gcloud compute tpus tpu-vm create) lists no workers in the
    # environment: tpu_pod.sh says --distributed=on and JAX asks the metadata server.
    ("on", {}, {"heartbeat_timeout_seconds": 100}),
    ("auto", {}, None),
    ("auto", {"TPU_WORKER_HOSTNAMES": "t1-w-0,t1-w-1"}, {"heartbeat_timeout_seconds": 100}),
    ("auto", {"TPU_WORKER_HOSTNAMES": "t1-w-0"}, None),  # a single-host slice
    ("auto", {"SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"}, {"heartbeat_timeout_seconds": 100}),
    ("off", {"SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"}, None),
  ],
)
def test_start_up_modes(monkeypatch, mode, environment, expected):
  for name in _CLUSTER_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  for name, value in environment.items():
    monkeypatch.setenv(name, value)
  calls = []
  monkeypatch.setattr(distributed, "_start", lambda *a, **kw: calls.append((a, kw)))
  started = distributed.initialize(mode=mode)
  assert started == (expected is not None)
  assert calls == ([] if expected is None else [((), expected)])


def test_start_up_flags_that_contradict_are_named(monkeypatch):
  monkeypatch.setattr(distributed, "_start", lambda *a, **kw: None)
  with pytest.raises(ValueError, match="--distributed='sometimes' must be one of auto, on, off"):
    distributed.initialize(mode="sometimes")
  with pytest.raises(ValueError, match="--distributed=off contradicts --coordinator_address"):
    distributed.initialize("127.0.0.1:1234", 2, 0, mode="off")


CITYSCAPES = f"--config={REPO / 'configs' / 'cityscapes.py'}"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  """Generated scenes in Cityscapes' layout: 8 to train on, 4 to validate."""
  root = tmp_path_factory.mktemp("cityscapes") / "tree"
  generated.write_dataset(str(root), 8, 4, (64, 128), seed=0)
  return str(root)


def _args(data_root, workdir, **extra):
  # configs/cityscapes.py at 64x128, the student alone: its 2 images per device make a
  # global batch of 8 on 1 x 4 and on 2 x 2 devices alike. The schedule's length is
  # fixed so runs of 2 and 4 steps agree. AdamW's eps 1.0 keeps updates proportional to
  # gradients (with 1e-8 a gradient that is float noise around 0 becomes a +-lr step in
  # either run), and a large rate makes a wrong batch visible in the parameters.
  values = {
    "method": "student",
    "image_size": "(64,128)",
    "data.root": data_root,
    "log_every": 1,
    "eval_every": 0,
    "count_flops": False,
    "optimizer.warmup_steps": 0,
    "optimizer.decay_steps": 4,
    "optimizer.eps": 1.0,
    "optimizer.lr": 0.05,
    **extra,
  }
  return [
    "--mode=train",
    CITYSCAPES,
    f"--workdir={workdir}",
    *(f"--config.{k}={v}" for k, v in values.items()),
  ]


def _run(cmd, environment):
  proc = subprocess.run(
    cmd,
    cwd=REPO,
    env=environment,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stdout[-4000:]
  return proc.stdout


def _assert_close(a, b):
  for path, x in jax.tree_util.tree_flatten_with_path(a)[0]:
    y = b
    for key in path:
      y = y[key.key]
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def _losses(workdir):
  return [r["loss"] for r in read_metrics(str(workdir)) if r["split"] == "train"]


def test_two_processes_match_one_and_their_checkpoint_resumes_in_one(
  tmp_path, data_root, compile_cache
):
  one = env(compile_cache, devices=4)
  # 1 process x 4 devices, 4 steps, a checkpoint at 2.
  out = _run(
    [
      "python",
      "-m",
      "transkd_jax.main",
      *_args(data_root, tmp_path / "one", total_steps=4, checkpoint_every=2),
    ],
    one,
  )
  assert "global batch 8 (2 per device x 4 devices); compile cache" in out
  # 2 processes x 2 devices, 2 steps, validating at the end.
  out = _run(
    ["bash", str(LAUNCH), "2", *_args(data_root, tmp_path / "two", total_steps=2, eval_every=2)],
    dict(env(compile_cache), DEVICES_PER_PROCESS="2"),
  )
  assert "process 1 of 2: 2 local of 4 devices" in out
  assert "global batch 8 (2 per device x 4 devices)" in out
  done = [line for line in out.splitlines() if "done: step 2" in line]
  assert len(done) == 1 and done[0].startswith("[process 0]")  # one console
  assert "on 4 images" in done[0]  # validation counted both processes' images
  _assert_close(final_params(tmp_path / "two", 2), final_params(tmp_path / "one", 2))
  # Only process 0 wrote the metrics (one row per step): the same losses, the same batches.
  np.testing.assert_allclose(_losses(tmp_path / "two"), _losses(tmp_path / "one")[:2], rtol=1e-5)
  # The 2-process checkpoint (model and data position) resumes in 1 process.
  out = _run(
    ["python", "-m", "transkd_jax.main", *_args(data_root, tmp_path / "two", total_steps=4)], one
  )
  assert "resumed from" in out
  np.testing.assert_allclose(_losses(tmp_path / "two"), _losses(tmp_path / "one"), rtol=1e-5)
  _assert_close(final_params(tmp_path / "two", 4), final_params(tmp_path / "one", 4))


def _start_two(tmp_path, data_root, compile_cache, port_offset, **extra):
  port = 23000 + port_offset * 7 + (int(time.time()) % 500) * 10
  values = {"total_steps": 100000, "checkpoint_every": 100000, **extra}
  common = [
    *_args(data_root, tmp_path, **values),
    f"--coordinator_address=127.0.0.1:{port}",
    "--num_processes=2",
    "--heartbeat_timeout=5",
  ]
  return [main([*common, f"--process_id={i}"], env(compile_cache, devices=2)) for i in (0, 1)]


def _two_processes(tmp_path, data_root, compile_cache, port_offset, first_step=1, **extra):
  """Two processes training, once process 0 has logged ``first_step``."""
  procs = _start_two(tmp_path, data_root, compile_cache, port_offset, **extra)
  wait_for(lambda: any(r["step"] >= first_step for r in read_metrics(str(tmp_path))), procs[0], 600)
  return procs


def test_an_error_in_one_process_stops_both(tmp_path, data_root, compile_cache):
  """Process 1 alone meets a bad data root: it exits at once, naming it, and process 0
  (waiting for it at a barrier) stops with an error instead of waiting forever."""
  bad_root = tmp_path / "not_a_dataset"
  bad_root.mkdir()
  (bad_root / "something.txt").write_text("x")
  port = 24000 + (int(time.time()) % 500) * 10
  common = [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", "--heartbeat_timeout=5"]
  procs = [
    main(
      [*_args(root, tmp_path / "run", total_steps=3), *common, f"--process_id={i}"],
      env(compile_cache, devices=2),
    )
    for i, root in ((0, data_root), (1, str(bad_root)))
  ]
  try:
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert procs[1].returncode != 0 and "not_a_dataset" in outs[1], outs[1][-2000:]
    assert procs[0].returncode != 0, outs[0][-2000:]
  finally:
    stop(procs)


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
  procs = _two_processes(tmp_path, data_root, compile_cache, 2, first_step=3, checkpoint_every=2)
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
  procs = _two_processes(
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
