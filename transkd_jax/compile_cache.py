"""The persistent compilation cache: a restarted run reads its compiled programs.

``config.compile_cache`` (default ``~/.cache/transkd_jax/xla``) is where XLA's
compiled programs are kept between starts, keyed by the program, the devices
and the JAX version: a resumed or repeated run skips the step's compile (minutes
for full-size models on a GPU or TPU) and only traces it. Empty turns the cache
off. ``JAX_COMPILATION_CACHE_DIR``, when set, wins over the config (JAX's own
setting). Where the ``filelock`` package is installed the cache is bounded
(least recently used entries go first), which also makes processes that share
it take a file lock around each entry; without it JAX keeps it unbounded.

XLA's cache skips the compile, not the trace: tracing the step (running the
model's Python to build the program) is most of what a second start still spends.
``compiled_step`` keeps the traced program too (``jax.export``'s serialised
StableHLO) beside the compiled ones, keyed by everything the trace depends on: the
package's source, the config, the arguments' shapes, dtypes and shardings, the
devices, the JAX / Flax / Optax / NumPy versions and JAX's settings. A second start
with the same key reads it back and only compiles, which XLA's cache answers.

``remembered(key, name, compute)`` keeps a number about a program (the train
step's FLOPs, which take a second trace to count) there as well, under the hash of
the program itself: a run resumed with another ``total_steps`` traces again (its
config changed) but reads the count.
"""

import functools
import hashlib
import importlib.util
import json
import os
import pathlib
import re
import sys
import time
import uuid
from typing import Callable, NamedTuple

import jax
import numpy as np
from etils import epath

MAX_BYTES = 8 << 30
KEEP_PROGRAMS = 16  # stored traced programs (a few MB each); the oldest go first


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


def _root():
  """Where this module keeps its files, or None when the cache is off."""
  root = jax.config.jax_compilation_cache_dir
  if not (jax.config.jax_enable_compilation_cache and root):
    return None
  return epath.Path(root) / "transkd_jax"


@functools.cache
def source_digest() -> str:
  """The hash of every Python file of the package: any change to the code misses."""
  package = pathlib.Path(__file__).resolve().parent
  digest = hashlib.sha256()
  for path in sorted(package.rglob("*.py")):
    digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
  return digest.hexdigest()


def _versions() -> str:
  names = ("jax", "jaxlib", "flax", "optax", "numpy")
  return " ".join(f"{n}={getattr(sys.modules.get(n), '__version__', '-')}" for n in names)


def _unkeyed(setting: str) -> bool:
  """JAX settings that cannot change a trace: the caches' own and logging."""
  return "cache" in setting or setting.startswith(("jax_log", "jax_debug_log"))


def program_key(name: str, args, salt: str = "") -> str:
  """A key for the program ``name`` traced for ``args`` (arrays or ShapeDtypeStructs
  with shardings): the source, versions, JAX settings, devices, the arguments' tree,
  shapes, dtypes and shardings, and ``salt`` (the config)."""
  leaves, tree = jax.tree.flatten(args)
  settings = sorted((k, repr(v)) for k, v in jax.config.values.items() if not _unkeyed(k))
  devices = [(d.id, d.platform, d.device_kind, d.process_index) for d in jax.devices()]
  parts = [
    name,
    _versions(),
    source_digest(),
    repr(settings),
    repr(devices),
    str(tree),
    *(
      f"{x.shape} {x.dtype} {getattr(x, 'weak_type', False)} {getattr(x, 'sharding', None)}"
      for x in leaves
    ),
    re.sub(r" at 0x[0-9a-f]+", "", salt),  # reprs of functions: addresses move per start
  ]
  return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def remembered(key: str, name: str, compute: Callable[[], float]) -> float:
  """``compute()``, kept in the cache directory under ``key`` (``Compiled.program``)
  and read back from there by a later start; computed each time when the cache is
  off, unreadable or ``key`` is empty."""
  root = _root()
  if root is None or not key:
    return compute()
  path = root / f"{name}-{key}.json"
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


class Compiled(NamedTuple):
  """``compiled_step``'s result: the step, and where its program came from."""

  call: Callable
  executable: object  # XLA's compiled program (its cost analysis, memory)
  program: str  # the hash of the traced program ("" when the cache is off)
  stored: bool  # read from the cache (no trace) or traced now
  trace_s: float  # tracing, or reading the stored program
  xla_s: float  # XLA's compile (or reading it from XLA's cache)


def compiled_step(jitted, args: tuple, out_shardings, key: str) -> Compiled:
  """``jitted`` (state donated, ``(state, *rest) -> (state, outputs)``) compiled for
  ``args``, through its traced program kept under ``key`` when the cache is on.

  ``outputs`` must be made of dicts, lists and tuples of arrays (``jax.export``
  keeps those); ``out_shardings`` is ``(state shardings, outputs' sharding)``. The
  stored program is the same StableHLO the trace gives, so the step computes the same
  values. A stored file that cannot be read is traced again and replaced; a program
  ``jax.export`` cannot keep is traced the plain way, with one line saying why. Errors
  of the step itself (its trace, XLA's compile) are raised as they come. With several
  processes, all of them read the stored program or none does.
  """
  from jax import export

  root = _root()
  start = time.perf_counter()
  if root is None:
    return _plain(jitted, args, start)
  path = root / f"step-{key}.exported"
  exported = _read(path)
  if jax.process_count() > 1:  # one program everywhere: read by all, or traced by all
    from jax.experimental import multihost_utils

    read = multihost_utils.process_allgather(np.int32(exported is not None))
    if not np.all(read):
      exported = None
  stored = exported is not None
  leaves, tree = jax.tree.flatten(args)
  if exported is None:

    def flat(*flat_args):
      state, outputs = jitted(*jax.tree.unflatten(tree, flat_args))
      return jax.tree.leaves(state), outputs

    specs = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for x in leaves]
    try:  # for the mesh's platform (the default backend's: named as export names it)
      exported = export.export(
        jax.jit(flat), disabled_checks=[export.DisabledSafetyCheck.custom_call("ALL")]
      )(*specs)
      data = exported.serialize()
    except Exception as e:  # raised again by the plain trace if the step itself is wrong
      print(
        f"warning: the train step's traced program cannot be kept ({type(e).__name__}: "
        f"{str(e)[:200]}); tracing it the plain way",
        flush=True,
      )
      return _plain(jitted, args, time.perf_counter())
    _write(path, data)
  traced = time.perf_counter() - start
  state_tree = jax.tree.structure(args[0])
  state_shardings, output_sharding = out_shardings
  wrapper = jax.jit(
    exported.call,
    in_shardings=tuple(x.sharding for x in leaves),
    out_shardings=(jax.tree.leaves(state_shardings), output_sharding),
    donate_argnums=tuple(range(state_tree.num_leaves)),
  )
  compiled = wrapper.lower(*leaves).compile()

  def call(*call_args):
    state_leaves, outputs = compiled(*jax.tree.leaves(call_args))
    return jax.tree.unflatten(state_tree, state_leaves), outputs

  program = hashlib.sha256(exported.mlir_module_serialized).hexdigest()
  return Compiled(call, compiled, program, stored, traced, time.perf_counter() - start - traced)


def _plain(jitted, args, start) -> Compiled:
  lowered = jitted.lower(*args)
  traced = time.perf_counter() - start
  call = lowered.compile()
  return Compiled(call, call, "", False, traced, time.perf_counter() - start - traced)


def _read(path):
  """The stored program at ``path``, or None (none yet, or one that cannot be read)."""
  from jax import export

  try:
    if not path.exists():
      return None
    return export.deserialize(bytearray(path.read_bytes()))
  except Exception as e:  # damaged, from another version, or storage trouble: traced again
    print(f"warning: {path} cannot be read ({type(e).__name__}); tracing the step", flush=True)
    return None


def _write(path, data: bytes):
  """Written whole or not at all (a temporary name, then a rename); the oldest stored
  programs beyond ``KEEP_PROGRAMS`` are removed."""
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f"{path.name}.{uuid.uuid4().hex}.tmp"  # one per writer
    temporary.write_bytes(data)
    temporary.replace(path)  # over a damaged one
  except Exception:  # a read-only or full cache: traced again next time
    return
  try:
    kept = sorted(path.parent.glob("step-*.exported"), key=lambda p: p.stat().st_mtime)
    for old in kept[:-KEEP_PROGRAMS]:
      old.unlink(missing_ok=True)
  except Exception:  # another process removed one first
    pass
