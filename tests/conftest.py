"""Shared test settings: small, deterministic, CPU."""

import os

# Tests run on the CPU with float32 matmuls at full precision.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests run tiny models, so XLA's compile time dominates their run time; LLVM's
# lowest optimisation level compiles ~2-3x faster and computes the same values.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


# grain's worker processes read absl flags; outside absl.app they must be marked parsed.
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  """A generated-dataset root shared by a test module's runs (written on first use)."""
  return str(tmp_path_factory.mktemp("generated") / "tree")


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  """A persistent XLA compilation cache shared by a test module's subprocess runs."""
  return str(tmp_path_factory.mktemp("xla_cache"))


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
    checkpointer.save(path, {"params": variables["params"],
                             "batch_stats": variables["batch_stats"]})
  return str(path)
