"""``python -m transkd_jax.bench WHAT`` (also ``python -m transkd_jax.benchmark WHAT``)."""

if __name__ == "__main__":  # before the imports below, which a re-exec would repeat
  from transkd_jax import hugepages

  hugepages.reexec()  # huge pages for XLA:CPU's buffers (transkd_jax/hugepages.py)

from transkd_jax.bench.cli import run

if __name__ == "__main__":
  run()
