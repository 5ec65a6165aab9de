"""The model families (SegFormer, PVTv2, LVT) through ``archs``: sizes, the shared contract."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_families import apply_jit, count, init_shapes, random_variables
from runs import TINY_LVT, TINY_PVT  # tiny rows with the real four-stage geometry

from transkd_jax.models import LVT, PVTv2, archs

# --------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------


# The public numbers: sum(p.numel() for p in model.parameters()) of the public
# PyTorch modules (github RuipingL/TransKD, train/models/), instantiated with timm /
# mmcv / mmseg stubbed (mmcv's ConvModule = conv (bias iff no norm) + optional BN + ReLU):
#   pvt_v2_b0 / pvt_v2_b2: models.pvtv2.pvtv2.build_pvts(name, num_classes)
#     (backbone + FPN + FPNHead); b0 = 3,409,760 + 2,492,416 + head, b2 = 24,849,856 +
#     2,623,488 + head, head = 1,622,912 + conv_seg.
#   lvt: models.lvt.backbone.lvt(rasa_cfg=dict(atrous_rates=[1, 3, 5],
#     act_layer='nn.SiLU(True)', init='kaiming', r_num=2)) (backbone + SegFormer head; its
#     num_classes is fixed at 20, so 19 classes swaps linear_pred for a 256 -> 19 conv).
# Parameters only: BatchNorm running statistics (LVT's head) are buffers there, batch_stats here.
@pytest.mark.parametrize(
  "arch,variant,num_classes,expected",
  [
    ("pvtv2", "pvt_v2_b0", 19, 7_527_539),
    ("pvtv2", "pvt_v2_b0", 20, 7_527_668),
    ("pvtv2", "pvt_v2_b2", 19, 29_098_707),
    ("pvtv2", "pvt_v2_b2", 20, 29_098_836),
    ("lvt", "lvt", 19, 3_836_919),
    ("lvt", "lvt", 20, 3_837_176),
  ],
)
def test_parameter_counts_match_public_code(arch, variant, num_classes, expected):
  shapes = init_shapes(archs.build(arch, variant, num_classes))
  assert count(shapes["params"]) == expected
  assert ("batch_stats" in shapes) == archs.has_batch_stats(arch)


def test_archs_table():
  assert set(archs.ARCHS) == {"segformer", "pvtv2", "lvt"}
  assert archs.stage_channels("segformer", "b0") == (32, 64, 160, 256)
  assert archs.stage_channels("pvtv2", "b2") == (64, 128, 320, 512)
  assert archs.stage_channels("lvt", "lvt") == (64, 64, 160, 256)
  assert [archs.has_batch_stats(a) for a in ("segformer", "pvtv2", "lvt")] == [True, False, True]
  with pytest.raises(ValueError, match="'segformer', 'pvtv2', 'lvt'"):
    archs.check_arch("swin")
  with pytest.raises(ValueError, match=r"b0, b1, b2, b3, b4, b5"):
    archs.build("pvtv2", "b7", 19)
  with pytest.raises(ValueError, match="expected one of lvt"):
    archs.build("lvt", "lvt_b2", 19)
  model = archs.build("lvt", "lvt", 7, kernels="cpu", dtype=jnp.bfloat16)
  assert (type(model), model.num_classes, model.kernels, model.dtype) == (
    LVT,
    7,
    "cpu",
    jnp.bfloat16,
  )


def test_bad_input_is_named():
  with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
    PVTv2(TINY_PVT).init(jax.random.key(0), jnp.zeros((1, 3, 32, 32)))
  with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
    LVT(TINY_LVT).init(jax.random.key(0), jnp.zeros((1, 3, 32, 32)))
  with pytest.raises(ValueError, match="num_classes"):
    LVT(TINY_LVT, num_classes=0).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


# --------------------------------------------------------------------------
# The models: shapes, names, encode, dtypes
# --------------------------------------------------------------------------


def _grid(size):
  grid = [(math.ceil(size[0] / 4), math.ceil(size[1] / 4))]
  for _ in range(3):
    grid.append((math.ceil(grid[-1][0] / 2), math.ceil(grid[-1][1] / 2)))
  return grid


@pytest.mark.parametrize(
  "model,channels",
  [
    (LVT("lvt", 19), (64, 64, 160, 256)),
    (PVTv2("b0", 19), (32, 64, 160, 256)),
  ],
)
@pytest.mark.parametrize("size", [(64, 64), (70, 90)])
def test_full_size_shapes(model, channels, size):
  variables = init_shapes(model, size)
  images = jax.ShapeDtypeStruct((2, *size, 3), jnp.float32)
  out = jax.eval_shape(model.apply, variables, images)
  grid = _grid(size)
  assert out["logits"].shape == (2, *grid[0], 19) and out["logits"].dtype == jnp.float32
  for i, c in enumerate(channels):
    assert out["features"][i].shape == (2, *grid[i], c)
    assert out["embeddings"][i].shape == (2, grid[i][0] * grid[i][1], c)


@pytest.mark.parametrize(
  "make",
  [lambda **k: PVTv2(TINY_PVT, 5, **k), lambda **k: LVT(TINY_LVT, 5, **k)],
  ids=["pvtv2", "lvt"],
)
def test_encode_matches_call(make):
  model = make()
  images = jax.random.uniform(jax.random.key(1), (2, 64, 64, 3))
  variables = random_variables(model, images)
  full = apply_jit(model, variables, images)
  assert full["logits"].shape == (2, 16, 16, 5)
  assert np.isfinite(np.asarray(full["logits"])).all()
  # Encoding needs no neck or head parameters at all.
  enc = apply_jit(
    model, {"params": {"encoder": variables["params"]["encoder"]}}, images, method="encode"
  )
  assert sorted(enc) == ["embeddings", "features"]
  for a, b in zip(full["features"] + full["embeddings"], enc["features"] + enc["embeddings"]):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Training mode traces with a dropout rng (and mutable batch_stats where there are any).
  mutable = ("batch_stats",) if "batch_stats" in variables else ()
  train = jax.eval_shape(
    lambda v, x: model.apply(
      v, x, train=True, mutable=mutable, rngs={"dropout": jax.random.key(3)}
    ),
    variables,
    images,
  )
  assert train[0]["logits"].shape == full["logits"].shape


@pytest.mark.parametrize(
  "make",
  [lambda **k: PVTv2(TINY_PVT, 3, **k), lambda **k: LVT(TINY_LVT, 3, **k)],
  ids=["pvtv2", "lvt"],
)
def test_bfloat16_compute_keeps_float32_params(make):
  """Dtypes are fixed at trace time: abstract evaluation shows them without compiling."""
  model = make(dtype=jnp.bfloat16)
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  out = jax.eval_shape(model.apply, variables, images)
  assert {x.dtype for x in out["features"] + out["embeddings"]} == {jnp.dtype(jnp.bfloat16)}
  assert out["logits"].dtype == jnp.float32
