"""Several processes on 127.0.0.1 (CPU devices, gloo): the multi-host code path.

configs/cityscapes.py at a tiny size, 2 images per device: 2 processes x 2 devices
train with a global batch of 8 to the parameters of 1 process x 4 devices; a
checkpoint they write resumes in 1 process; an error in one process stops both.
(Preemption, damage and a killed process: test_preemption.py.)
"""

import subprocess
import time

import jax
import numpy as np
import pytest
from multiprocess import args as _args
from multiprocess import cityscapes_tree
from runs import REPO, env, final_params, main, stop

from transkd_jax import distributed
from transkd_jax.logs import read_metrics


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  return cityscapes_tree(tmp_path_factory)


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
  # The first run's arguments: the same program, read from the cache (no trace).
  out = _run(
    [
      "python",
      "-m",
      "transkd_jax.main",
      *_args(data_root, tmp_path / "two", total_steps=4, checkpoint_every=2),
    ],
    one,
  )
  assert "resumed from" in out and "stored program read in" in out
  np.testing.assert_allclose(_losses(tmp_path / "two"), _losses(tmp_path / "one"), rtol=1e-5)
  _assert_close(final_params(tmp_path / "two", 4), final_params(tmp_path / "one", 4))


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
