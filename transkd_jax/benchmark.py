"""``python -m transkd_jax.benchmark step|data|eval|model|compile|infer``: see transkd_jax/bench/.

The same command as ``python -m transkd_jax.bench``, whose ``__main__`` this runs.
"""

if __name__ == "__main__":
  import runpy

  runpy.run_module("transkd_jax.bench", run_name="__main__", alter_sys=True)
