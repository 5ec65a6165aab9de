"""config.compile_cache: where main keeps compiled programs (main prints it at start-up:
tests/test_distributed.py)."""

import os

import jax

from transkd_jax import compile_cache


def test_empty_turns_the_cache_off_and_jax_compilation_cache_dir_wins():
  keys = ("jax_enable_compilation_cache", "jax_compilation_cache_dir")
  saved = {k: getattr(jax.config, k) for k in keys}
  try:
    assert compile_cache.enable("") == "off (config.compile_cache is empty)"
    assert jax.config.jax_enable_compilation_cache is False
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", "/tmp/set_by_the_variable")
    where = compile_cache.enable("~/.cache/transkd_jax/xla")
    assert where == "/tmp/set_by_the_variable (JAX_COMPILATION_CACHE_DIR)"
    jax.config.update("jax_compilation_cache_dir", None)
    home = os.path.expanduser("~")
    assert compile_cache.enable("~/.cache/transkd_jax/xla") == f"{home}/.cache/transkd_jax/xla"
    assert jax.config.jax_compilation_cache_dir == f"{home}/.cache/transkd_jax/xla"
    jax.config.update("jax_compilation_cache_dir", None)
    assert compile_cache.enable("gs://bucket/xla") == "gs://bucket/xla"
    assert jax.config.jax_compilation_cache_dir == "gs://bucket/xla"
  finally:
    for k, v in saved.items():
      jax.config.update(k, v)


def test_without_filelock_the_cache_stays_unbounded(monkeypatch):
  """JAX refuses a bounded cache without the filelock package (a base install lacks it)."""
  import importlib.util

  find_spec = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util, "find_spec", lambda name, *a: None if name == "filelock" else find_spec(name)
  )
  saved = jax.config.jax_compilation_cache_max_size
  try:
    jax.config.update("jax_compilation_cache_max_size", -1)
    compile_cache.enable("~/.cache/transkd_jax/xla")
    assert jax.config.jax_compilation_cache_max_size == -1
  finally:
    jax.config.update("jax_compilation_cache_max_size", saved)


def test_a_programs_flops_are_counted_once_per_cache(tmp_path):
  """The step's FLOPs (a second trace) are kept beside the compiled programs, keyed by
  the program: a second start reads them; another program, or no cache, counts again."""
  import jax.numpy as jnp

  calls = []

  def count(value):
    return lambda: calls.append(value) or value

  square = jax.jit(lambda x: x * x).lower(jnp.ones(3))
  cube = jax.jit(lambda x: x * x * x).lower(jnp.ones(3))
  keys = ("jax_enable_compilation_cache", "jax_compilation_cache_dir")
  saved = {k: getattr(jax.config, k) for k in keys}
  try:
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    assert compile_cache.remembered(square, "step_flops", count(3.0)) == 3.0
    assert compile_cache.remembered(square, "step_flops", count(99.0)) == 3.0
    assert compile_cache.remembered(cube, "step_flops", count(6.0)) == 6.0
    assert calls == [3.0, 6.0]
    assert len(list((tmp_path / "transkd_jax").iterdir())) == 2
    (next((tmp_path / "transkd_jax").iterdir())).write_text("{trunc")  # a torn write
    compile_cache.remembered(square, "step_flops", count(3.0))
    compile_cache.remembered(cube, "step_flops", count(6.0))
    assert len(calls) == 3
    jax.config.update("jax_enable_compilation_cache", False)
    assert compile_cache.remembered(square, "step_flops", count(3.0)) == 3.0
    assert len(calls) == 4
  finally:
    for k, v in saved.items():
      jax.config.update(k, v)
