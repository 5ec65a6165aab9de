"""The gpu kernel form: cuDNN's flash attention on NVIDIA GPUs (models/kernels.py).

This machine has no GPU, but JAX lowers a program for CUDA on any host: the tests read
the lowered program for cuDNN's fused-attention calls. JAX asks the installed cuDNN for
its version before it lowers them; with no CUDA libraries here, the tests give it one
(9.10). With JAX's CUDA plugin installed (``pip install -e '.[cuda]'``, not in the test
extras: about 3 GB), ``benchmark compile --topology=h100`` compiles for a GPU without one,
and one test here does. Only the last test runs the kernel; it needs a GPU and
``JAX_PLATFORMS=cuda``.
"""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from runs import tiny_config

from transkd_jax import build
from transkd_jax.bench import compile as compile_bench
from transkd_jax.errors import UserError
from transkd_jax.models import kernels

FORWARD, BACKWARD = "__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"
ON_GPU = jax.default_backend() == "gpu"


def _cuda_plugin() -> bool:
  try:
    compile_bench.topology_devices("h100")
    return True
  except UserError:
    return False


CUDA_PLUGIN = _cuda_plugin()


@pytest.fixture
def cudnn(monkeypatch):
  """Lets JAX lower cuDNN's attention for CUDA on a host without CUDA libraries."""
  if not ON_GPU:
    from jax._src.cudnn import fused_attention_stablehlo

    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)


def cuda_custom_calls(jitted, *args) -> collections.Counter:
  """The custom-call targets of ``jitted`` lowered for CUDA, counted."""
  text = jitted.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  return collections.Counter(re.findall(r"custom_call @([\w$.]+)", text))


def _qkv(dtype, tokens=512, keys=8, heads=1, head_dim=32):
  shapes = ((2, tokens, heads, head_dim), (2, keys, heads, head_dim), (2, keys, heads, head_dim))
  return [jax.ShapeDtypeStruct(s, dtype) for s in shapes]


def _attention_and_grads(form):
  def loss(q, k, v):
    return jnp.sum(jnp.sin(kernels.attention(q, k, v, form).astype(jnp.float32)))

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def test_auto_gives_the_gpu_form_on_ampere_or_newer_only():
  assert kernels.resolve("auto", "gpu", "9.0") == kernels.resolve("auto", "gpu", "8.0") == "gpu"
  # A T4 (7.5) or V100 (7.0) has no cuDNN flash attention; ROCm devices name no capability.
  for capability in ("7.5", "7.0", None, "gfx90a"):
    assert kernels.resolve("auto", "gpu", capability) == "native"
  assert kernels.resolve("gpu", "gpu", "8.6") == "gpu"
  with pytest.raises(ValueError, match="compute capability 8.0 or newer; these are gpu devices"):
    kernels.resolve("gpu", "gpu", "7.5")
  with pytest.raises(ValueError, match="needs NVIDIA GPUs .* these are tpu devices"):
    kernels.resolve("gpu", "tpu")


def test_bfloat16_attention_and_its_gradient_lower_to_cudnn_flash_attention(cudnn):
  """MiT's stage 1 at 512 x 1024 per image: 32,768 queries, 512 keys, 1 head of 32 (B0)."""
  qkv = _qkv(jnp.bfloat16, tokens=32768, keys=512)
  calls = cuda_custom_calls(_attention_and_grads("gpu"), *qkv)
  assert calls[FORWARD] == 1 and calls[BACKWARD] == 1
  assert not cuda_custom_calls(_attention_and_grads("native"), *qkv)[FORWARD]


@pytest.mark.parametrize(
  "dtype, head_dim",
  [(jnp.float32, 32), (jnp.bfloat16, 12), (jnp.bfloat16, 160)],  # f32; heads cuDNN refuses
)
def test_what_cudnn_does_not_take_runs_xlas_attention(cudnn, dtype, head_dim):
  qkv = _qkv(dtype, head_dim=head_dim)
  assert not kernels.cudnn_fits(*qkv)
  assert not cuda_custom_calls(_attention_and_grads("gpu"), *qkv)[FORWARD]
  # And on this CPU the gpu form computes XLA's attention, value for value.
  q, k, v = (
    jnp.asarray(np.random.default_rng(i).normal(size=a.shape), dtype) for i, a in enumerate(qkv)
  )
  np.testing.assert_array_equal(
    kernels.attention(q, k, v, "gpu"), jax.nn.dot_product_attention(q, k, v)
  )


def test_the_bfloat16_transkd_step_runs_every_attention_through_cudnn(cudnn, monkeypatch):
  """TransKD-Base (tiny rows, four stages of one block each): the teacher's four attentions
  and the student's four run cuDNN's forward, the student's four its backward; none of them
  writes its queries x keys scores out. In float32 none does."""
  monkeypatch.setattr(build, "kernels_of", lambda config, mesh: "gpu")
  for dtype, forward, backward in (("bfloat16", 8, 4), ("float32", 0, 0)):
    config = tiny_config(method="transkd_base", dtype=dtype, teacher_dtype=dtype)
    run = build.training(config, weights=False)
    assert run.kernels == "gpu"
    state = jax.eval_shape(run.new_state)
    teacher = jax.eval_shape(lambda run=run: run.teacher_variables(random=True))
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in build.batch_spec(config).items()}
    calls = cuda_custom_calls(run.train_step, state, teacher, batch)
    assert (calls[FORWARD], calls[BACKWARD]) == (forward, backward), dtype


def test_a_gpu_topology_is_described_by_jaxs_cuda_plugin_or_the_error_names_it():
  if CUDA_PLUGIN:
    devices = compile_bench.topology_devices("h200:2")
    assert len(devices) == 2 and {d.device_kind for d in devices} == {"NVIDIA H200"}
    assert devices[0].platform == "gpu" and devices[0].compute_capability == "9.0"
    assert kernels.resolve_for("auto", devices[0]) == "gpu"
  else:
    with pytest.raises(UserError, match=r"--topology=h100: .*pip install -e '\.\[cuda\]'"):
      compile_bench.topology_devices("h100")
  with pytest.raises(UserError, match="expected h100 or h100:N, N GPUs of one host"):
    compile_bench.topology_devices("h100:0")


def test_a_gpu_compile_counts_the_native_steps_flops_lowered_on_the_cpu():
  """XLA:GPU gives no FLOP count without a GPU: the whole step's, lowered for this CPU with
  the native kernels, grows with the batch."""
  config = tiny_config(method="transkd_base", batch_size=2)
  two = compile_bench._flops_lowered_on_cpu(config)
  config.batch_size = 4
  four = compile_bench._flops_lowered_on_cpu(config)
  assert two > 0 and four == pytest.approx(2 * two, rel=0.02)  # the optimiser's is fixed


@pytest.mark.skipif(not CUDA_PLUGIN, reason="needs JAX's CUDA plugin (pip install -e '.[cuda]')")
def test_the_bfloat16_transkd_step_compiles_for_an_h100_without_one():
  """The tiny TransKD step, 8 images, compiled for one H100: the gpu form, cuDNN's attention
  in all 12 calls (as lowered above), memory against 80 GiB, FLOPs from the CPU, and the
  roofline on the HBM bytes only (XLA:GPU counts no bytes)."""
  config = tiny_config(
    method="transkd_base", dtype="bfloat16", teacher_dtype="bfloat16", batch_size=8
  )
  row = compile_bench.compile_report(config, "h100", with_eval=False)
  assert (row["platform"], row["device_kind"], row["kernels"]["form"]) == (
    "gpu",
    "NVIDIA H100 80GB HBM3",
    "gpu",
  )
  ops = row["kernels"]["compiled_ops"]
  # Mix-FFN's depthwise convs are cuDNN's: 4 + 4 forward, the student's 4 + 4 backward.
  assert ops["cudnn_attention"] == 12 and ops["grouped_convolution"] == 16, ops
  assert row["fits"] and row["hbm_capacity_gib"] == 80 and 0 < row["hbm_gib_per_device"] < 1
  assert row["tflops_per_step_per_device"] > 0 and row["collectives"] == {}
  assert row["est_step_ms"] is None and row["est_imgs_per_s_per_chip_hbm_only"] > 0


@pytest.mark.skipif(not ON_GPU, reason="runs cuDNN's kernel: needs a GPU and JAX_PLATFORMS=cuda")
def test_cudnn_attention_and_its_gradients_equal_xlas_on_a_gpu():
  keys = jax.random.split(jax.random.key(0), 4)
  shapes = ((2, 4096, 2, 32), (2, 256, 2, 32), (2, 256, 2, 32))
  q, k, v = (jax.random.normal(key, s, jnp.bfloat16) for key, s in zip(keys, shapes))
  g = jax.random.normal(keys[3], shapes[0], jnp.bfloat16)
  out, vjp = jax.vjp(lambda *a: kernels.attention(*a, "gpu"), q, k, v)
  ref, vjp_ref = jax.vjp(lambda *a: kernels.attention(*a, "native"), q, k, v)
  for a, b, name in zip((out, *vjp(g)), (ref, *vjp_ref(g)), ("out", "dq", "dk", "dv")):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, atol=0.02 * np.abs(b).max(), err_msg=name)  # bfloat16
