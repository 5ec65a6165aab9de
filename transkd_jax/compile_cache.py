"""The persistent compilation cache: a restarted run reads its compiled programs.

``config.compile_cache`` (default ``~/.cache/transkd_jax/xla``) is where XLA's
compiled programs are kept between starts, keyed by the program, the devices
and the JAX version: a resumed or repeated run skips the step's compile (minutes
for full-size models on a GPU or TPU) and only traces it. Empty turns the cache
off. ``JAX_COMPILATION_CACHE_DIR``, when set, wins over the config (JAX's own
setting). Where the ``filelock`` package is installed the cache is bounded
(least recently used entries go first), which also makes processes that share
it take a file lock around each entry; without it JAX keeps it unbounded.

``remembered(lowered, name, compute)`` keeps a number about a program (the train
step's FLOPs, which take a second trace to count) beside the compiled programs,
keyed by the program's text, so that a second start skips that trace as well.
"""

import hashlib
import importlib.util
import json
import os
from typing import Callable

import jax
from etils import epath

MAX_BYTES = 8 << 30


def enable(path: str) -> str:
  """Turns the cache on at ``path`` (a local directory or a URI), or off for "";
  returns where it is, for the start-up line."""
  if not path:
    jax.config.update("jax_enable_compilation_cache", False)
    return "off (config.compile_cache is empty)"
  # JAX bounds the cache only with a file lock (the filelock package, which the test
  # extra brings); without it the cache stays unbounded, as JAX's default.
  if jax.config.jax_compilation_cache_max_size == -1 and importlib.util.find_spec("filelock"):
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
  if jax.config.jax_compilation_cache_dir:  # JAX_COMPILATION_CACHE_DIR
    return f"{jax.config.jax_compilation_cache_dir} (JAX_COMPILATION_CACHE_DIR)"
  path = path if "://" in path else os.path.expanduser(path)
  jax.config.update("jax_compilation_cache_dir", path)
  return path


def remembered(lowered, name: str, compute: Callable[[], float]) -> float:
  """``compute()``, kept in the cache directory under the hash of ``lowered``'s
  program text (with the JAX version and platform) and read back from there by a
  later start; computed each time when the cache is off or unreadable."""
  root = jax.config.jax_compilation_cache_dir
  if not (jax.config.jax_enable_compilation_cache and root):
    return compute()
  key = hashlib.sha256(
    f"{jax.__version__} {jax.default_backend()} {name}\n{lowered.as_text()}".encode()
  ).hexdigest()
  path = epath.Path(root) / "transkd_jax" / f"{name}-{key}.json"
  try:
    return float(json.loads(path.read_text())["value"])
  except (OSError, ValueError, KeyError, TypeError):
    pass  # not written yet (or by an older start): counted now
  value = compute()
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"value": value}))
  except OSError:
    pass  # a read-only cache: counted again next time
  return value
