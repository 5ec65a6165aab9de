"""Shared test settings: small, deterministic, CPU."""

import os

# Tests run on the CPU with float32 matmuls at full precision.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests run tiny models, so XLA's compile time dominates their run time. LLVM's
# lowest optimisation level and XLA:CPU's older loop emitters (instead of its
# fusion emitters) together compile tiny steps about 2-3x faster and compute the
# same values up to float rounding. Subprocess runs (tests/runs.py) inherit them.
_FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
_flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(
  [_flags, *(f for f in _FAST_COMPILE if f.split("=")[0] not in _flags)]
).strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


# grain's worker processes read absl flags; outside absl.app they must be marked parsed.
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()


import pytest  # noqa: E402

# The slowest test files first: with one file per xdist worker at a time, starting the long
# ones early keeps every worker busy to the end (longest-processing-time-first; the
# order of each file's summed --durations=0 on a 2-core CPU, 2026-12-03).
_SLOW_FIRST = (
  "test_distill",
  "test_models",
  "test_bench_compile",
  "test_distributed",
  "test_train",
  "test_main",
  "test_train_step",
  "test_build",
  "test_preemption",
  "test_convert",
  "test_recipe",
  "test_launch",
  "test_bench",
  "test_export",
  "test_convert_pairs",
  "test_checkpoint",
  "test_weights_infer",
  "test_predict",
  "test_evaluate",
  "test_archs",
  "test_eval_step",
  "test_onnx",
)


def pytest_collection_modifyitems(items):
  def rank(item):
    name = item.path.stem
    return _SLOW_FIRST.index(name) if name in _SLOW_FIRST else len(_SLOW_FIRST)

  items.sort(key=rank)  # stable: each file's tests keep their order


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  """A generated-dataset root shared by a test module's runs (written on first use)."""
  return str(tmp_path_factory.mktemp("generated") / "tree")


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
  """A persistent XLA compilation cache shared by every subprocess run of the session.

  Runs in different test files often compile the same program (a B0 student on
  64x128 scenes): one directory for both xdist workers lets the second read what
  the first compiled. ``runs.env`` turns on the cache's file lock, so two
  processes never read an entry while it is being written.
  """
  base = tmp_path_factory.getbasetemp()
  root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  path = root / "xla_cache"
  path.mkdir(exist_ok=True)
  return str(path)


@pytest.fixture(scope="session", autouse=True)
def _shared_compilation_cache(compile_cache):
  """The tests' own compiles use that cache too (those that take over a second)."""
  from jax.experimental.compilation_cache import compilation_cache

  jax.config.update("jax_compilation_cache_max_size", 8 << 30)  # with the file lock
  compilation_cache.reset_cache()
  compilation_cache.set_cache_dir(compile_cache)
  # Every subprocess uses it too (the variable wins over main's config.compile_cache),
  # instead of ~/.cache/transkd_jax, and bounded like this process: a process with an
  # unbounded cache writes entries without the access-time files the others evict by.
  variables = {
    "JAX_COMPILATION_CACHE_DIR": compile_cache,
    "JAX_COMPILATION_CACHE_MAX_SIZE": "8589934592",
  }
  previous = {k: os.environ.get(k) for k in variables}
  os.environ.update(variables)
  yield
  compilation_cache.reset_cache()
  for k, v in previous.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  """A random B0 teacher (19 classes; small, to keep compiles short), saved as convert does."""
  import jax.numpy as jnp
  import orbax.checkpoint as ocp

  from transkd_jax.models import SegFormer

  path = tmp_path_factory.mktemp("teacher") / "b0"
  model = SegFormer("b0", 19)
  variables = jax.jit(model.init)(jax.random.key(5), jnp.zeros((1, 64, 128, 3)))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(
      path, {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    )
  return str(path)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  """A generated 64x128 tree and a B0 'converted' checkpoint whose head predicts several
  classes (eval and predict tests)."""
  import jax.numpy as jnp

  from transkd_jax.data import generated
  from transkd_jax.models import SegFormer
  from transkd_jax.weights.record import save

  base = tmp_path_factory.mktemp("evalpred")
  root = str(base / "tree")
  generated.write_dataset(root, 4, 3, (64, 128), seed=0)
  model = SegFormer("b0", 19)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 64, 128, 3)))
  # A random head predicts one class everywhere; a larger classifier spreads the argmax.
  variables = jax.tree_util.tree_map_with_path(
    lambda p, x: x * 30 if "linear_pred" in jax.tree_util.keystr(p) else x, variables
  )
  ckpt = str(base / "ckpt")
  save(jax.device_get(variables), ckpt, {"arch": "mit_b0", "num_classes": 19})
  return {"root": root, "ckpt": ckpt, "model": model, "variables": variables}
