"""config.compile_cache: where main keeps compiled programs (main prints it at start-up:
tests/test_distributed.py)."""

import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


@pytest.fixture
def cache_dir(tmp_path):
  keys = ("jax_enable_compilation_cache", "jax_compilation_cache_dir")
  saved = {k: getattr(jax.config, k) for k in keys}
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", str(tmp_path))
  yield tmp_path
  for k, v in saved.items():
    jax.config.update(k, v)


def test_a_programs_flops_are_counted_once_per_cache(cache_dir):
  """The step's FLOPs (a second trace) are kept beside the compiled programs, keyed by
  the program: a second start reads them; another program, or no cache, counts again."""
  calls = []

  def count(value):
    return lambda: calls.append(value) or value

  square, cube = "a" * 64, "b" * 64  # two programs' keys
  assert compile_cache.remembered(square, "step_flops", count(3.0)) == 3.0
  assert compile_cache.remembered(square, "step_flops", count(99.0)) == 3.0
  assert compile_cache.remembered(cube, "step_flops", count(6.0)) == 6.0
  assert calls == [3.0, 6.0]
  assert len(list((cache_dir / "transkd_jax").iterdir())) == 2
  (next((cache_dir / "transkd_jax").iterdir())).write_text("{trunc")  # a torn write
  compile_cache.remembered(square, "step_flops", count(3.0))
  compile_cache.remembered(cube, "step_flops", count(6.0))
  assert len(calls) == 3
  jax.config.update("jax_enable_compilation_cache", False)
  assert compile_cache.remembered(square, "step_flops", count(3.0)) == 3.0
  assert len(calls) == 4


@flax.struct.dataclass
class _State:
  step: jax.Array
  params: dict


def _toy_step(traces):
  """A jitted step of the train step's form: (state, extra, batch) -> (state, metrics),
  state donated; ``traces`` counts how often its Python runs."""

  def step(state, extra, batch):
    traces.append(1)
    grad = jax.tree.map(lambda w: jnp.mean(batch["x"]) * w + extra, state.params)
    params = jax.tree.map(lambda w, g: w - 0.1 * g, state.params, grad)
    loss = sum(jnp.sum(g * g) for g in jax.tree.leaves(grad))
    return state.replace(step=state.step + 1, params=params), {"loss": loss, "n": state.step}

  return jax.jit(step, donate_argnums=(0,))


def _toy_args():
  state = _State(jnp.int32(0), {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)})
  return state, jnp.float32(0.5), {"x": jnp.linspace(0.0, 1.0, 8)}


def test_a_second_start_reads_the_traced_program_and_computes_the_same(cache_dir, capsys):
  """The first compile traces and keeps the program (jax.export); a second one with the
  same key runs no Python of the step, and both give the plain jit's values exactly."""
  traces = []  # each compile gets a fresh jit, so a trace is never answered from memory
  plain_state, plain_metrics = _toy_step([])(*_toy_args())
  state = _toy_args()[0]
  shardings = (jax.tree.map(lambda x: x.sharding, state), jax.tree.leaves(state)[0].sharding)
  key = compile_cache.program_key("toy", _toy_args(), salt="config")

  first = compile_cache.compiled_step(_toy_step(traces), _toy_args(), shardings, key)
  assert not first.stored and len(traces) == 1 and len(first.program) == 64
  assert [p.name for p in (cache_dir / "transkd_jax").iterdir()] == [f"step-{key}.exported"]
  second = compile_cache.compiled_step(_toy_step(traces), _toy_args(), shardings, key)
  assert second.stored and len(traces) == 1  # no trace
  assert second.program == first.program  # the FLOPs' key (remembered)
  for step in (first, second):
    new_state, metrics = step.call(*_toy_args())
    assert isinstance(new_state, _State)
    for a, b in zip(
      jax.tree.leaves((new_state, metrics)), jax.tree.leaves((plain_state, plain_metrics))
    ):
      np.testing.assert_array_equal(a, b)
    again, _ = step.call(new_state, *_toy_args()[1:])  # the step's output state is its input
    assert int(again.step) == 2

  # A damaged stored program is traced again (and replaced), with one line saying so.
  path = cache_dir / "transkd_jax" / f"step-{key}.exported"
  path.write_bytes(path.read_bytes()[:100])
  third = compile_cache.compiled_step(_toy_step(traces), _toy_args(), shardings, key)
  assert not third.stored and len(traces) == 2 and "cannot be read" in capsys.readouterr().out
  assert compile_cache.compiled_step(_toy_step(traces), _toy_args(), shardings, key).stored
  # The cache off: a plain trace, nothing kept.
  jax.config.update("jax_enable_compilation_cache", False)
  fourth = compile_cache.compiled_step(_toy_step(traces), _toy_args(), shardings, key)
  assert not fourth.stored and len(traces) == 3 and fourth.program == ""


def test_the_programs_key_follows_code_config_and_arguments(monkeypatch):
  args = _toy_args()
  key = compile_cache.program_key("toy", args, salt="config")
  assert compile_cache.program_key("toy", _toy_args(), salt="config") == key
  assert compile_cache.program_key("toy", args, salt="other config") != key
  # A module's repr names its functions with their addresses, which move from start to start.
  moved = compile_cache.program_key("toy", args, salt="fn=<function csf at 0x7f1e55c51620>")
  assert moved == compile_cache.program_key("toy", args, salt="fn=<function csf at 0x7f00aa>")
  state, extra, batch = args
  assert compile_cache.program_key("toy", (state, extra, {"x": batch["x"][:4]}), "config") != key
  assert (
    compile_cache.program_key("toy", (state, extra.astype(jnp.bfloat16), batch), "config") != key
  )
  assert compile_cache.program_key("toy", (state, {"e": extra}, batch), "config") != key
  monkeypatch.setattr(compile_cache, "source_digest", lambda: "edited code")
  assert compile_cache.program_key("toy", args, salt="config") != key


def test_a_step_export_cannot_keep_is_traced_the_plain_way(cache_dir, capsys):
  """A host callback cannot be serialised: one warning line, then the plain jit, whose
  step runs as written; nothing is stored."""

  def step(state, extra, batch):
    doubled = jax.pure_callback(
      lambda x: np.asarray(x) * 2, jax.ShapeDtypeStruct((), jnp.float32), jnp.sum(batch["x"])
    )
    return {"w": state["w"] + doubled}, {"loss": doubled}

  args = ({"w": jnp.ones(3)}, None, {"x": jnp.ones(4)})
  sharding = jax.tree.leaves(args)[0].sharding
  out = compile_cache.compiled_step(
    jax.jit(step, donate_argnums=(0,)), args, ({"w": sharding}, sharding), "c" * 64
  )
  assert "cannot be kept (NotImplementedError" in capsys.readouterr().out
  assert not out.stored and out.program == ""
  state, metrics = out.call(*args)
  np.testing.assert_array_equal(state["w"], [9.0, 9.0, 9.0])
  assert float(metrics["loss"]) == 8.0
  assert not list((cache_dir / "transkd_jax").glob("*.exported"))
