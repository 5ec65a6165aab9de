"""``python -m transkd_jax.benchmark step|data|eval|model|compile``: see transkd_jax/bench/."""

from transkd_jax.bench.cli import run

if __name__ == "__main__":
  run()
