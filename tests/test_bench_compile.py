"""Compiling for a TPU slice without one: the train step built over the devices of a
``v5e:2x2`` topology description (libtpu, no TPU), checked on the compiled program.

Tiny models at 64x64: compiling for TPU costs minutes at full size.
"""

import math
import re

import jax
import jax.numpy as jnp
import pytest
from runs import tiny_config

from transkd_jax import build, sharding
from transkd_jax.bench import compile as compile_bench
from transkd_jax.errors import UserError
from transkd_jax.models import kernels

pytest.importorskip("libtpu", reason="the test extra brings libtpu")

_ALL_GATHER = re.compile(r"= ([a-z0-9]+)\[([\d,]*)\]\{[^}]*\} all-gather(?:-start)?\(")


@pytest.fixture(autouse=True, scope="module")
def _default_precision():
  """The TPU's own matmul precision (conftest asks for "highest", which on a TPU is a
  six-pass float32 emulation: a larger program, slower to compile, same structure)."""
  with jax.default_matmul_precision("default"):
    yield


def _config(**overrides):
  settings = dict(num_classes=5, image_size=(64, 64), batch_size=8)
  settings.update(overrides)
  return tiny_config(**settings)


@pytest.fixture(scope="module")
def student_row(tmp_path_factory):
  """A tiny student's train and eval steps compiled for TPU v5e 2x2 (8 images); the
  train step's HLO text saved beside (``--save_hlo``)."""
  hlo = tmp_path_factory.mktemp("hlo") / "step.hlo"
  row = compile_bench.compile_report(_config(method="student"), "v5e:2x2", save_hlo=str(hlo))
  return {**row, "saved_hlo": hlo.read_text()}


def test_a_tpu_topology_gets_the_tpu_kernels_and_data_parallel_all_reduces(student_row):
  row = student_row
  assert jax.default_backend() == "cpu"  # the host compiles; the program is for the TPU
  assert (row["platform"], row["device_kind"], row["devices"], row["hosts"]) == (
    "tpu",
    "TPU v5 lite",
    4,
    1,
  )
  ops = row["kernels"]["compiled_ops"]
  assert row["kernels"]["form"] == "tpu" and ops["grouped_convolution"] > 0
  assert ops["pallas_kernel"] == 0  # 64x64 leaves attention too short for splash: native
  assert ops["gather"] <= 1  # the cross-entropy's label pick; no resize gathers
  assert set(row["collectives"]) == {"all-reduce"}  # gradients and BatchNorm statistics
  assert row["fits"] and row["hbm_capacity_gib"] == 16
  assert row["tflops_per_step_per_device"] > 0 and row["est_step_ms"] > 0
  assert row["eval_hbm_gib_per_device"] > 0
  assert row["saved_hlo"].startswith("HloModule") and "tpu" in row["saved_hlo"].lower()
  # The HBM-only bound counts fewer bytes than XLA's, which also counts VMEM operands.
  assert row["est_imgs_per_s_per_chip_hbm_only"] >= row["est_imgs_per_s_per_chip"]
  every_op = compile_bench.traffic(row["saved_hlo"], top=None)
  assert row["traffic_by_part"] == compile_bench.traffic_by_part(every_op)
  parts = {p["part"] for p in compile_bench.traffic_by_part(every_op, top=len(every_op))}
  assert "student/encoder/block1/attn" in parts and row["traffic_gib_from_shapes"] > 0
  # XLA:TPU's own estimate of its ops' time at the v5e's 1.5 GHz, by part.
  cycles = sum(r["cycles"] for r in every_op)
  assert cycles > 0 and row["est_step_ms_compiler"] == pytest.approx(cycles / 1.5e6, rel=1e-3)
  assert row["est_imgs_per_s_per_chip_compiler"] == pytest.approx(
    2 / (row["est_step_ms_compiler"] / 1e3), rel=1e-3
  )
  times = {p["part"]: p["ms"] for p in row["time_by_part"]}
  assert "student/encoder/block1/attn" in times
  assert sum(times.values()) <= row["est_step_ms_compiler"] * 1.0001


def test_the_memory_figure_grows_with_the_batch(student_row):
  """Measured on the eval step (its compile costs a third of a train step's): the
  student row's at 8 images against 32."""
  config = _config(method="student", batch_size=32)
  run = build.training(config, weights=False, devices=compile_bench.topology_devices("v5e:2x2"))
  compiled = run.eval_step.lower(
    run.deployed(run.abstract_state), compile_bench.eval_batch_spec(config, run.mesh)
  ).compile()
  memory = [student_row["eval_hbm_gib_per_device"], compile_bench._memory_gib(compiled)]
  assert memory[1] > memory[0] > 0
  # Where the bytes go: the ten heaviest ops, sorted; every op with its module and FLOPs
  # (at this size most of them work in VMEM and move no HBM bytes).
  rows = compile_bench.traffic(compiled.as_text())
  assert len(rows) == 10 and [r["bytes"] for r in rows] == sorted(
    (r["bytes"] for r in rows), reverse=True
  )
  every_op = compile_bench.traffic(compiled.as_text(), top=None)
  assert any("encoder/" in r["module"] and r["flops"] > 0 for r in every_op)


def test_the_kernel_form_follows_the_compiled_devices_unless_forced():
  tpu = build.mesh_of(_config(), compile_bench.topology_devices("v5e:2x2"))
  cpu = build.mesh_of(_config(), jax.devices()[:1])
  assert [build.kernels_of(_config(kernels=k), tpu) for k in ("auto", "cpu", "native", "tpu")] == [
    "tpu",
    "cpu",
    "native",
    "tpu",
  ]
  assert [build.kernels_of(_config(kernels=k), cpu) for k in ("auto", "cpu", "native")] == [
    "cpu",
    "cpu",
    "native",
  ]
  with pytest.raises(UserError, match="needs TPU devices; these are cpu devices"):
    build.kernels_of(_config(kernels="tpu"), cpu)
  with pytest.raises(UserError, match="needs NVIDIA GPUs of compute capability 8.0 or newer"):
    build.kernels_of(_config(kernels="gpu"), cpu)
  run = build.training(
    _config(method="transkd_base", kernels="cpu"), weights=False, devices=tpu.devices.flat
  )
  assert run.kernels == run.model.kernels == run.teacher.model.kernels == "cpu"


def test_transkd_base_under_fsdp_all_gathers_parameters_and_never_the_batch(monkeypatch):
  monkeypatch.setattr(sharding, "FSDP_MIN_SIZE", 1024)  # so tiny kernels really get split
  config = _config(method="transkd_base", sharding="fsdp", mesh_shape=(2, 2))
  run = build.training(config, weights=False, devices=compile_bench.topology_devices("v5e:2x2"))
  compiled = run.train_step.lower(
    run.abstract_state, run.teacher.abstract, build.batch_spec(config, run.mesh)
  ).compile()
  # Gradients come back to each device as its shard only.
  assert "reduce-scatter" in compile_bench.hlo_summary(compiled.as_text())["collectives"]
  split = {
    math.prod(x.shape)
    for x in jax.tree.leaves((run.abstract_state.params, run.teacher.abstract))
    if x.sharding.spec != jax.sharding.PartitionSpec()
  }
  assert split  # the rule split some parameters along "model"
  gathered = [
    tuple(int(d) for d in dims.split(",") if d)
    for _, dims in _ALL_GATHER.findall(compiled.as_text())
  ]
  assert gathered
  # Every all-gather brings a whole parameter (XLA may gather it reshaped) ...
  assert {math.prod(shape) for shape in gathered} <= split
  # ... and never the batch, which stays split along "data".
  batch = build.batch_spec(config)
  assert not {batch["image"].shape, batch["label"].shape} & set(gathered)


def test_sizing_errors_name_the_fix():
  with pytest.raises(UserError, match="--topology=v9z:1x1: cannot describe it"):
    compile_bench.topology_devices("v9z:1x1")
  row = {
    "fits": False,
    "hbm_gib_per_device": 20.5,
    "hbm_capacity_gib": 16.0,
    "batch_size": 32,
    "mesh_shape": [4, 1],
    "sharding": "replicate",
    "dtype": "float32",
    "device_kind": "TPU v5 lite",
  }
  line = compile_bench.does_not_fit(row)
  assert line.startswith(
    "the step needs 20.50 GiB per device, 4.50 GiB more than the TPU v5 lite's 16.0 GiB"
  )
  assert "8 per device" in line and "fsdp" in line and "bfloat16" in line
  assert compile_bench.does_not_fit({**row, "fits": True}) is None


def test_collectives_are_counted_with_their_bytes():
  hlo = """
  %all-reduce.1 = (f32[32]{0}, bf16[8,16]{1,0}) all-reduce(%a, %b), channel_id=2
  %ag = f32[4,256]{1,0:T(8,128)} all-gather(%p), dimensions={0}
  %x = f32[2]{0} add(%all-reduce.1, %ag)
  %c = f32[8,8,3,3]{3,2,1,0} convolution(%i, %k), feature_group_count=8
  %g = f32[2,16]{1,0} gather(%t, %idx), offset_dims={}
  %ags = (f32[4,8]{1,0}, f32[8,8]{1,0}) all-gather-start(%q), dimensions={0}
  %agd = f32[8,8]{1,0} all-gather-done(%ags)
%all-reduce-scatter.9 (input_0: f32[8,8]) -> f32[4,8] {
  %inner = f32[8,8]{1,0} all-reduce(%input_0), to_apply=%add
  ROOT %s = f32[4,8]{1,0} dynamic-slice(%inner, %i, %j), dynamic_slice_sizes={4,8}
}
  %rs = f32[4,8]{1,0} fusion(%grad), kind=kCustom, calls=%all-reduce-scatter.9
  """
  summary = compile_bench.hlo_summary(hlo)
  assert summary["collectives"] == {
    "all-reduce": {"count": 1, "bytes": 32 * 4 + 8 * 16 * 2},
    "all-gather": {"count": 2, "bytes": 4 * 256 * 4 + 8 * 8 * 4},
    "reduce-scatter": {"count": 1, "bytes": 4 * 8 * 4},
  }
  assert summary["ops"]["grouped_convolution"] == 1 and summary["ops"]["gather"] == 1


# fmt: off
HLO = """HloModule jit_step, entry_computation_layout={()->f32[2,8]{1,0}}

%fused_dot (p0: f32[2,4], p1: f32[4,8]) -> f32[2,8] {
  %p0 = f32[2,4]{1,0} parameter(0)
  %p1 = f32[4,8]{1,0} parameter(1)
  ROOT %dot.1 = f32[2,8]{1,0} dot(f32[2,4]{1,0} %p0, f32[4,8]{1,0} %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (a: f32[2,4], b: f32[4,8], x: f32[1,6,6,3], k: f32[3,3,3,5]) -> f32[2,8] {
  %a = f32[2,4]{1,0} parameter(0)
  %b = f32[4,8]{1,0} parameter(1)
  %x = f32[1,6,6,3]{3,2,1,0} parameter(2)
  %k = f32[3,3,3,5]{3,2,1,0} parameter(3)
  %conv = f32[1,4,4,5]{3,2,1,0} convolution(f32[1,6,6,3]{3,2,1,0} %x, f32[3,3,3,5]{3,2,1,0} %k), window={size=3x3}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(step)/jvp(student)/student/encoder/patch_embed1/proj/conv_general_dilated"}, backend_config={"window_config":{"estimated_cycles":"1500","iteration_bounds":["1"]}}
  ROOT %fusion = f32[2,8]{1,0} fusion(f32[2,4]{1,0} %a, f32[4,8]{1,0} %b), kind=kOutput, calls=%fused_dot, metadata={op_name="jit(step)/student/head/linear_pred/dot_general"}
}
"""  # noqa: E501
# fmt: on


def test_traffic_counts_each_ops_bytes_and_flops_by_module():
  conv, fusion = compile_bench.traffic(HLO)
  assert conv["op"] == "conv" and conv["kind"] == "convolution"
  assert conv["bytes"] == 4 * (1 * 4 * 4 * 5 + 1 * 6 * 6 * 3 + 3 * 3 * 3 * 5)
  assert conv["flops"] == 2 * (4 * 4 * 5) * (3 * 3 * 3)
  assert conv["module"] == "student/encoder/patch_embed1/proj/conv_general_dilated"
  assert (conv["cycles"], fusion["cycles"]) == (1500, 0)  # XLA:TPU's estimate; none given
  assert fusion["kind"] == "fusion:kOutput" and fusion["flops"] == 2 * 2 * 8 * 4
  assert fusion["bytes"] == 4 * (2 * 8 + 2 * 4 + 4 * 8)
  assert fusion["module"] == "student/head/linear_pred/dot_general"


def test_a_dot_written_as_a_convolution_counts_the_taps_that_land_on_the_input():
  """XLA:TPU writes some dots as convolutions whose window slides over a length-1 input
  padded on both sides: each output element takes one tap of the window, not all 8."""
  line = (
    "%c = f32[8,2,4]{2,1,0} convolution(f32[1,2,3]{2,1,0} %x, f32[3,8,4]{2,1,0} %k), "
    "window={size=8 pad=7_7}, dim_labels=0bf_i0o->0bf"
  )
  operands = "f32[1,2,3]{2,1,0} %x, f32[3,8,4]{2,1,0} %k"
  assert compile_bench._flops("convolution", "f32[8,2,4]{2,1,0}", operands, line) == 2 * 64 * 3


# fmt: off
PLACED_HLO = """HloModule jit_step

ENTRY %main (w: f32[64,64], x: f32[8,64]) -> f32[8,64] {
  %w = f32[64,64]{1,0:T(8,128)} parameter(0)
  %x = f32[8,64]{1,0:T(8,128)} parameter(1)
  %cs = (f32[64,64]{1,0:T(8,128)S(1)}, f32[64,64]{1,0:T(8,128)}, u32[]{:S(2)}) copy-start(%w)
  %cd = f32[64,64]{1,0:T(8,128)S(1)} copy-done(%cs)
  %ss = ((f32[64,64]{1,0:T(8,128)}), f32[16,64]{1,0:T(8,128)S(1)}, s32[]{:S(2)}) slice-start(%w), slice={[0:16], [0:64]}
  %sv = ((f32[64,64]{1,0:T(8,128)S(1)}), f32[16,64]{1,0:T(8,128)S(1)}, s32[]{:S(2)}) slice-start(%cd), slice={[0:16], [0:64]}
  %y = f32[8,64]{1,0:T(8,128)S(1)} fusion(f32[8,64]{1,0:T(8,128)} %x, f32[64,64]{1,0:T(8,128)S(1)} %cd), kind=kOutput, calls=%f
  ROOT %z = f32[8,64]{1,0:T(8,128)} fusion(f32[8,64]{1,0:T(8,128)S(1)} %y), kind=kLoop, calls=%g
}
"""  # noqa: E501
# fmt: on


def test_traffic_counts_hbm_only_and_a_prefetch_once():
  """A weight prefetched into VMEM (S(1)) counts once, at its copy-start (the HBM read);
  a slice of it read from HBM counts the slice;
  the fusion that reads it there and writes its result to VMEM counts only x from HBM; the
  last fusion counts only its HBM result. Each as stored: 64 columns padded to the
  layout's 128-wide tile."""
  rows = {r["op"]: r["bytes"] for r in compile_bench.traffic(PLACED_HLO, top=None)}
  # A slice of w from HBM into VMEM reads its 16 rows; one of the VMEM copy, nothing.
  assert rows == {
    "cs": 64 * 128 * 4,
    "y": 8 * 128 * 4,
    "z": 8 * 128 * 4,
    "ss": 16 * 128 * 4,
    "sv": 0,
  }
  assert compile_bench._stored_elements("3,5,40", "{2,1,0:T(8,128)}") == 3 * 8 * 128
  assert compile_bench._stored_elements("3,5,40", "{1,2,0:T(8,128)}") == 3 * 128 * 40
  assert compile_bench._stored_elements("3,5,40", "{2,1,0}") == 3 * 5 * 40


def test_traffic_by_part_adds_a_stages_blocks_and_keeps_every_byte():
  rows = [
    {"module": "student/encoder/block1_0/attn/proj/dot_general", "bytes": 30, "flops": 2e9},
    {"module": "student/encoder/block1_1/attn/dot_general", "bytes": 20, "flops": 1e9},
    {"module": "student/encoder/block1_1/mlp/fc1/dot_general", "bytes": 10, "flops": 0.0},
    {"module": "fusion/pea/dense/dot_general", "bytes": 25, "flops": 0.0},
    {"module": "", "kind": "copy", "bytes": 15, "flops": 0.0},
  ]
  for row, cycles in zip(rows, (100, 200, 600, 100, 0)):
    row["cycles"] = cycles
  parts = compile_bench.traffic_by_part(rows)
  assert [(p["part"], p["ops"], p["share"], p["gflop"]) for p in parts] == [
    ("student/encoder/block1/attn", 2, 0.5, 3.0),
    ("fusion/pea/dense", 1, 0.25, 0.0),
    ("(no module: copy)", 1, 0.15, 0.0),
    ("student/encoder/block1/mlp", 1, 0.1, 0.0),
  ]
  assert [p["part"] for p in compile_bench.traffic_by_part(rows, top=2)] == [
    "student/encoder/block1/attn",
    "fusion/pea/dense",
  ]
  by_time = compile_bench.traffic_by_part(rows, order="cycles")
  assert [(p["part"], p["cycles"], p["share"]) for p in by_time] == [
    ("student/encoder/block1/mlp", 600, 0.6),
    ("student/encoder/block1/attn", 300, 0.3),
    ("fusion/pea/dense", 100, 0.1),
    ("(no module: copy)", 0, 0.0),
  ]
  # Every op of a compiled HLO is counted once: the parts add up to the ops' bytes.
  every_op = compile_bench.traffic(HLO, top=None)
  assert sum(p["gib"] for p in compile_bench.traffic_by_part(every_op)) == pytest.approx(
    sum(r["bytes"] for r in every_op) / 2**30, abs=1e-4
  )


def test_splash_attention_compiles_for_tpu_and_moves_a_fraction_of_the_native_bytes():
  """MiT's stage-1 attention in miniature (4,096 queries, 512 keys, head_dim 32, bfloat16),
  forward and backward, 8 images split over the four v5e chips as the train step splits
  them (traced on the mesh: the kernel shard_maps itself, else XLA refuses to partition
  it): the tpu form is Pallas kernels (custom calls), and XLA's bytes accessed per chip
  are under half the native form's, whose (queries x keys) scores go through HBM."""
  mesh = sharding.make_mesh((-1, 1), compile_bench.topology_devices("v5e:2x2"))
  split = sharding.batch_sharding(mesh)
  q = jax.ShapeDtypeStruct((8, 4096, 1, 32), jnp.bfloat16, sharding=split)
  kv = jax.ShapeDtypeStruct((8, 512, 1, 32), jnp.bfloat16, sharding=split)
  compiled = {}
  for form in ("native", "tpu"):

    def loss(q, k, v, form=form):
      return kernels.attention(q, k, v, form).astype(jnp.float32).sum()

    step = sharding.traced_on(mesh, jax.grad(loss, argnums=(0, 1, 2)))
    compiled[form] = jax.jit(step).lower(q, kv, kv).compile()
  ops = {f: compile_bench.hlo_summary(c.as_text())["ops"] for f, c in compiled.items()}
  assert ops["native"]["pallas_kernel"] == 0 and ops["tpu"]["pallas_kernel"] >= 2  # fwd, bwd
  moved = {f: compile_bench._cost(c)["bytes accessed"] for f, c in compiled.items()}
  assert 0 < moved["tpu"] < 0.5 * moved["native"]


def test_the_tpu_image_patch_embedding_moves_a_fraction_of_the_strided_convs_bytes():
  """MiT's first patch embedding (7x7, stride 4, padding 3, 3 -> 32 channels) over 8 bfloat16
  images of 512x1024 per chip, with its kernel gradient, compiled for v5e 2x2: the tpu
  form (the image folded into 4x4 blocks) moves under a fifth of the HBM bytes of the
  strided conv, whose 3-channel input XLA:TPU lays out batch-minor (512 MiB for 24 MiB of
  images). A fold that went through a padded copy of the image (768 MiB) fails this."""
  mesh = sharding.make_mesh((-1, 1), compile_bench.topology_devices("v5e:2x2"))
  image = jax.ShapeDtypeStruct(
    (32, 512, 1024, 3), jnp.uint8, sharding=sharding.batch_sharding(mesh)
  )
  kernel = jax.ShapeDtypeStruct((7, 7, 3, 32), jnp.bfloat16, sharding=sharding.replicated(mesh))
  numbers = jax.lax.conv_dimension_numbers(image.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))
  moved = {}
  for form in ("native", "tpu"):

    def loss(kernel, image, form=form):
      x = image.astype(jnp.bfloat16) / 255
      y = kernels.patch_conv(form)(x, kernel, (4, 4), ((3, 3), (3, 3)), dimension_numbers=numbers)
      return jnp.square(y.astype(jnp.float32)).mean()

    text = jax.jit(jax.grad(loss)).lower(kernel, image).compile().as_text()
    moved[form] = sum(row["bytes"] for row in compile_bench.traffic(text, top=None))
  assert moved["native"] > 3 * 2**30 / 4  # the batch-minor input, read twice
  assert 0 < moved["tpu"] < 0.2 * moved["native"]
