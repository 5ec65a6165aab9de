"""Helpers for tests that run ``python -m transkd_jax.main`` in subprocesses."""

import os
import pathlib
import subprocess
import sys
import time

import ml_collections

from transkd_jax.checkpoint import restore_pytree
from transkd_jax.models import LVTVariant, MiTVariant

REPO = pathlib.Path(__file__).resolve().parent.parent
SYNTHETIC = f"--config={REPO / 'configs' / 'synthetic.py'}"
# configs/synthetic.py with the tiny rows below (tests/tiny.py): subprocess runs that
# test the run's machinery, not the model, compile in seconds.
TINY_SYNTHETIC = f"--config={REPO / 'tests' / 'tiny.py'}:synthetic"

# Tiny rows (MiT / PVTv2, LVT): the same four-stage geometry, a fraction of the widths.
TINY_STUDENT = MiTVariant((8, 16, 24, 32), (1, 1, 1, 1), (1, 1, 1, 2), 32)
TINY_TEACHER = MiTVariant((16, 32, 48, 64), (1, 1, 1, 1), (1, 2, 2, 4), 32)
TINY_PVT = MiTVariant(
  (8, 16, 24, 32), (1, 1, 1, 1), (1, 2, 2, 4), decoder_width=16, mlp_ratios=(8, 8, 4, 4)
)
TINY_LVT = LVTVariant(
  channels=(8, 8, 16, 16),
  depths=(1, 1, 1, 1),
  heads=(2, 2, 2, 4),
  mlp_ratios=(4, 8, 4, 4),
  decoder_width=16,
)


def load_config(path):
  """A config file's ConfigDict, loaded as main loads it."""
  import importlib.util

  spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def synthetic_config():
  return load_config(REPO / "configs" / "synthetic.py")


def set_variant(config, role, variant):
  """``config.<role>.variant = variant``, also across str / MiTVariant (a type-safe field)."""
  config[role] = ml_collections.ConfigDict({**config[role].to_dict(), "variant": variant})


def with_tiny_rows(config):
  """``config`` with TINY_STUDENT and TINY_TEACHER as its models (also tests/tiny.py)."""
  set_variant(config, "student", TINY_STUDENT)
  set_variant(config, "teacher", TINY_TEACHER)
  return config


def tiny_config(data_root="", **overrides):
  """configs/synthetic.py with tiny MiT rows, 64x128 generated scenes and a short run."""
  config = with_tiny_rows(synthetic_config())
  config.update(
    image_size=(64, 128), batch_size=2, total_steps=6, log_every=1, eval_every=0, checkpoint_every=0
  )
  config.optimizer.warmup_steps = 0
  config.teacher.check_images = 0  # test_build checks the teacher check itself
  config.count_flops = False  # one more trace per run; test_train's end-to-end run counts
  config.recipe.pairs = ()  # the tiny pair only (synthetic.py:full lists full-size pairs)
  config.recipe.seeds = 1  # synthetic.py runs 3
  config.data.update(root=str(data_root), num_train=8, num_val=4, generated_size=(64, 128))
  config.update(overrides)
  return config


def stop(procs):
  """Kills and reaps whatever is still running of ``procs``."""
  for p in procs:
    if p.poll() is None:
      p.kill()
    p.wait()


def overrides(data_root, **extra):
  """--config.* flags for a tiny B0 run on generated 64x128 scenes."""
  values = {
    "image_size": "(64,128)",
    "batch_size": 2,
    "data.root": data_root,
    "data.num_train": 8,
    "data.num_val": 4,
    "data.generated_size": "(64,128)",
    "log_every": 1,
    "eval_every": 0,
    "optimizer.warmup_steps": 0,
    "teacher.check_images": 0,
    "count_flops": False,
    **extra,
  }
  return [f"--config.{k}={v}" for k, v in values.items()]


def env(cache, devices=None):
  """CPU, a shared persistent compilation cache, and optionally N CPU devices."""
  out = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    JAX_COMPILATION_CACHE_DIR=cache,
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    # A size limit turns on eviction, and with it the cache's file lock: test
    # processes share the directory (conftest.compile_cache).
    JAX_COMPILATION_CACHE_MAX_SIZE=str(8 << 30),
  )
  if devices:
    out["XLA_FLAGS"] = (
      f"--xla_force_host_platform_device_count={devices} {os.environ.get('XLA_FLAGS', '')}"
    )
  return out


def main(args, env, **kw):
  return subprocess.Popen(
    [sys.executable, "-m", "transkd_jax.main", *args],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    **kw,
  )


def final_params(workdir, step):
  path = pathlib.Path(workdir) / "checkpoints" / str(step) / "state"
  return restore_pytree(str(path))["params"]


def wait_for(predicate, proc, timeout=300):
  start = time.time()
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f"run ended early: {proc.stdout.read()[-3000:]}")
    if time.time() - start > timeout:
      proc.kill()
      raise AssertionError("timed out")
    time.sleep(0.2)


def served_config(served, **predict):
  """A config that evaluates / predicts with the ``served`` fixture's checkpoint."""
  from transkd_jax.config import base_config

  config = base_config()
  config.image_size = (64, 128)
  config.batch_size = 2
  config.method = "student"
  config.eval.checkpoint = served["ckpt"]
  config.data.update(
    {"root": served["root"], "num_train": 4, "num_val": 3, "generated_size": (64, 128)}
  )
  config.predict.update(predict)
  return config
