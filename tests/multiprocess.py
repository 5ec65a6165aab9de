"""Shared by the multi-process tests (test_distributed.py, test_preemption.py): a
generated Cityscapes-layout tree and the arguments of a tiny configs/cityscapes.py run,
and two processes of it started on 127.0.0.1."""

import time

from runs import REPO, env, main, stop, wait_for

from transkd_jax.data import generated
from transkd_jax.logs import read_metrics

# configs/cityscapes.py with tiny student and teacher rows (tests/tiny.py).
CITYSCAPES = f"--config={REPO / 'tests' / 'tiny.py'}:cityscapes"


def cityscapes_tree(tmp_path_factory):
  """Generated scenes in Cityscapes' layout: 8 to train on, 4 to validate (each test
  module's ``data_root`` fixture)."""
  root = tmp_path_factory.mktemp("cityscapes") / "tree"
  generated.write_dataset(str(root), 8, 4, (64, 128), seed=0)
  return str(root)


def args(data_root, workdir, **extra):
  # configs/cityscapes.py (tiny rows) at 64x128, the student alone: its 2 images per device make a
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


def start_two(tmp_path, data_root, compile_cache, port_offset, **extra):
  port = 23000 + port_offset * 7 + (int(time.time()) % 500) * 10
  values = {"total_steps": 100000, "checkpoint_every": 100000, **extra}
  common = [
    *args(data_root, tmp_path, **values),
    f"--coordinator_address=127.0.0.1:{port}",
    "--num_processes=2",
    "--heartbeat_timeout=5",
  ]
  return [main([*common, f"--process_id={i}"], env(compile_cache, devices=2)) for i in (0, 1)]


def two_processes(tmp_path, data_root, compile_cache, port_offset, first_step=1, **extra):
  """Two processes training, once process 0 has logged ``first_step``."""
  procs = start_two(tmp_path, data_root, compile_cache, port_offset, **extra)
  logged = lambda: any(r["step"] >= first_step for r in read_metrics(str(tmp_path)))  # noqa: E731
  try:
    wait_for(logged, procs[0], 300)
  except AssertionError as e:
    stop(procs)  # both outputs, so a hang or a crash of either process is seen
    outs = [p.stdout.read()[-3000:] for p in procs]
    raise AssertionError(f"{e}\n--- process 0:\n{outs[0]}\n--- process 1:\n{outs[1]}") from None
  return procs
