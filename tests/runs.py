"""Helpers for tests that run ``python -m transkd_jax.main`` in subprocesses."""

import os
import pathlib
import subprocess
import sys
import time

from transkd_jax.checkpoint import restore_pytree

REPO = pathlib.Path(__file__).resolve().parent.parent
SYNTHETIC = f"--config={REPO / 'configs' / 'synthetic.py'}"


def synthetic_config():
  """configs/synthetic.py's ConfigDict, loaded as main loads a config file."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("synthetic", REPO / "configs" / "synthetic.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def stop(procs):
  """Kills and reaps whatever is still running of ``procs``."""
  for p in procs:
    if p.poll() is None:
      p.kill()
    p.wait()


def overrides(data_root, **extra):
  """--config.* flags for a tiny B0 run on generated 64x128 scenes."""
  values = {"image_size": "(64,128)", "batch_size": 2, "data.root": data_root,
            "data.num_train": 8, "data.num_val": 4, "data.generated_size": "(64,128)",
            "log_every": 1, "eval_every": 0, "optimizer.warmup_steps": 0, **extra}
  return [f"--config.{k}={v}" for k, v in values.items()]


def env(cache, devices=None):
  """CPU, a shared persistent compilation cache, and optionally N CPU devices."""
  out = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  if devices:
    out["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} "
                        f"{os.environ.get('XLA_FLAGS', '')}")
  return out


def main(args, env, **kw):
  return subprocess.Popen([sys.executable, "-m", "transkd_jax.main", *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


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
