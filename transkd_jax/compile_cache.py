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
from typing import Callable, NamedTuple

import jax
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


def program_key(name: str, args, salt: str = "") -> str:
  """A key for the program ``name`` traced for ``args`` (arrays or ShapeDtypeStructs
  with shardings): the source, versions, JAX settings, devices, the arguments' tree,
  shapes, dtypes and shardings, and ``salt`` (the config)."""
  leaves, tree = jax.tree.flatten(args)
  settings = sorted(
    (k, repr(v)) for k, v in jax.config.values.items() if "cache" not in k and "log" not in k
  )
  devices = [(d.id, d.platform, d.device_kind, d.process_index) for d in jax.devices()]
  parts = [
    name,
    _versions(),
    source_digest(),
    repr(settings),
    repr(devices),
    str(tree),
    *(f"{x.shape} {x.dtype} {getattr(x, 'sharding', None)}" for x in leaves),
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
  values. Anything going wrong with the stored form (an old file, a program
  ``jax.export`` cannot keep) falls back to tracing, with one line saying why.
  """
  root = _root()
  start = time.perf_counter()
  if root is not None:
    try:
      return _through_export(jitted, args, out_shardings, root / f"step-{key}.exported", start)
    except Exception as e:  # an optimisation only: the plain trace below still runs
      print(
        f"warning: the train step's traced program is not kept ({type(e).__name__}: "
        f"{str(e)[:200]}); tracing it",
        flush=True,
      )
  start = time.perf_counter()
  lowered = jitted.lower(*args)
  traced = time.perf_counter() - start
  call = lowered.compile()
  return Compiled(call, call, "", False, traced, time.perf_counter() - start - traced)


def _through_export(jitted, args, out_shardings, path, start) -> Compiled:
  from jax import export

  leaves, tree = jax.tree.flatten(args)
  state_tree = jax.tree.structure(args[0])
  n_state = state_tree.num_leaves
  exported, stored = None, False
  if path.exists():
    try:
      exported, stored = export.deserialize(bytearray(path.read_bytes())), True
    except Exception as e:  # damaged or from another version: traced again
      print(f"warning: {path} cannot be read ({type(e).__name__}); tracing the step", flush=True)
  if exported is None:

    def flat(*flat_args):
      state, outputs = jitted(*jax.tree.unflatten(tree, flat_args))
      return jax.tree.leaves(state), outputs

    specs = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for x in leaves]
    platform = next(iter(leaves[0].sharding.device_set)).platform
    exported = export.export(
      jax.jit(flat),
      platforms=[platform],
      disabled_checks=[export.DisabledSafetyCheck.custom_call("ALL")],
    )(*specs)
    _write(path, exported.serialize())
  traced = time.perf_counter() - start
  state_shardings, output_sharding = out_shardings
  wrapper = jax.jit(
    exported.call,
    in_shardings=tuple(x.sharding for x in leaves),
    out_shardings=(jax.tree.leaves(state_shardings), output_sharding),
    donate_argnums=tuple(range(n_state)),
  )
  compiled = wrapper.lower(*leaves).compile()

  def call(*call_args):
    state_leaves, outputs = compiled(*jax.tree.leaves(call_args))
    return jax.tree.unflatten(state_tree, state_leaves), outputs

  program = hashlib.sha256(exported.mlir_module_serialized).hexdigest()
  return Compiled(call, compiled, program, stored, traced, time.perf_counter() - start - traced)


def _write(path, data: bytes):
  """Written whole or not at all (a temporary name, then a rename); the oldest stored
  programs beyond ``KEEP_PROGRAMS`` are removed."""
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f"{path.name}.{os.getpid()}.tmp"
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
