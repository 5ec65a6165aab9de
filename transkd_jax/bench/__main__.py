"""``python -m transkd_jax.bench WHAT`` (also ``python -m transkd_jax.benchmark WHAT``)."""

from transkd_jax.bench.cli import run

if __name__ == "__main__":
  run()
