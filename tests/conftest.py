"""Shared test settings: small, deterministic, CPU."""

import os

# Tests run on the CPU with float32 matmuls at full precision.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
