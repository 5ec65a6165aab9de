"""SegFormer / MiT: sizes, shapes and the invariants the rest of the code uses."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from runs import TINY_STUDENT

from transkd_jax.models import VARIANTS, SegFormer, archs, kernels
from transkd_jax.models import initializers as init
from transkd_jax.models.head import SegFormerHead
from transkd_jax.models.kernels import softmax_attention
from transkd_jax.models.mit import DepthwiseConv3x3, PatchConv, gelu
from transkd_jax.models.resize import (
  bilinear_matrix,
  nearest_indices,
  resize_bilinear,
  resize_nearest,
)


def _param_count(variant, num_classes, size=(64, 64)):
  model = SegFormer(variant, num_classes)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *size, 3))))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["params"]))


@pytest.mark.parametrize(
  "variant,num_classes,expected",
  [
    ("b0", 20, 3_719_284),
    ("b2", 20, 27_362_004),
    ("b0", 19, 3_719_027),
    ("b2", 19, 27_361_235),
  ],
)
def test_parameter_counts_match_public_code(variant, num_classes, expected):
  assert _param_count(variant, num_classes) == expected


def test_larger_variants_grow_with_depth():
  counts = [_param_count(v, 19) for v in ("b1", "b2", "b3", "b4", "b5")]
  assert counts == sorted(counts)
  # B1 has B0's depths with B2's widths: the head (width 256 vs 768) differs.
  assert 13e6 < counts[0] < 14e6
  assert 84e6 < counts[-1] < 86e6  # MiT-B5 SegFormer is ~84.7 M


@pytest.fixture(scope="module")
def b0_and_vars():
  model = SegFormer("b0", num_classes=5)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  return model, variables


def _apply(model, *args, **kwargs):
  """model.apply under jit (eager op-by-op dispatch is slow on CPU)."""
  static = tuple(k for k in ("train", "method", "mutable") if k in kwargs)
  return jax.jit(model.apply, static_argnames=static)(*args, **kwargs)


@pytest.mark.parametrize("size", [(64, 128), (70, 90)])
def test_output_shapes(b0_and_vars, size):
  model, variables = b0_and_vars
  images = jax.random.uniform(jax.random.key(1), (2, *size, 3))
  out = _apply(model, variables, images)
  h, w = size
  # Stage i has stride 4 * 2**i with PyTorch's conv arithmetic (ceil for these paddings).
  grid = [(math.ceil(h / 4), math.ceil(w / 4))]
  for _ in range(3):
    grid.append((math.ceil(grid[-1][0] / 2), math.ceil(grid[-1][1] / 2)))
  assert out["logits"].shape == (2, *grid[0], 5)
  assert out["logits"].dtype == jnp.float32
  for i, channels in enumerate(VARIANTS["b0"].channels):
    assert out["features"][i].shape == (2, *grid[i], channels)
    assert out["embeddings"][i].shape == (2, grid[i][0] * grid[i][1], channels)
  assert np.isfinite(np.asarray(out["logits"])).all()


def test_encode_matches_full_call_and_skips_head(b0_and_vars):
  model, variables = b0_and_vars
  images = jax.random.uniform(jax.random.key(2), (1, 64, 64, 3))
  full = _apply(model, variables, images)
  enc = _apply(model, variables, images, method="encode")
  assert "logits" not in enc
  for a, b in zip(full["features"] + full["embeddings"], enc["features"] + enc["embeddings"]):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Encoding needs no head parameters at all.
  enc_only = _apply(
    model, {"params": {"encoder": variables["params"]["encoder"]}}, images, method="encode"
  )
  np.testing.assert_array_equal(
    np.asarray(enc_only["features"][3]), np.asarray(full["features"][3])
  )


def test_train_mode_uses_dropout_rng_and_updates_batch_stats(b0_and_vars):
  model, variables = b0_and_vars
  images = jax.random.uniform(jax.random.key(3), (2, 64, 64, 3))
  with pytest.raises(Exception, match="dropout"):
    _apply(model, variables, images, train=True, mutable=("batch_stats",))
  run = lambda key: _apply(
    model, variables, images, train=True, rngs={"dropout": key}, mutable=("batch_stats",)
  )
  out_a, state = run(jax.random.key(4))
  out_b, _ = run(jax.random.key(5))
  assert not np.allclose(out_a["logits"], out_b["logits"])  # stochastic depth / dropout
  old = variables["batch_stats"]["head"]["bn"]["mean"]
  new = state["batch_stats"]["head"]["bn"]["mean"]
  assert not np.allclose(old, new)
  # Evaluation is deterministic and leaves the statistics alone.
  np.testing.assert_array_equal(
    _apply(model, variables, images)["logits"], _apply(model, variables, images)["logits"]
  )


def test_bfloat16_compute_keeps_float32_params():
  model = SegFormer(TINY_STUDENT, num_classes=3, dtype=jnp.bfloat16)
  images = jnp.zeros((1, 64, 64, 3))
  variables = jax.jit(model.init)(jax.random.key(0), images)
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  out = _apply(model, variables, images)
  assert out["features"][0].dtype == jnp.bfloat16
  assert out["logits"].dtype == jnp.float32


def test_depthwise_forms_agree():
  x = jax.random.normal(jax.random.key(0), (2, 9, 7, 12))
  conv = DepthwiseConv3x3(kernels="native")
  shifted = DepthwiseConv3x3(kernels="cpu")
  params = conv.init(jax.random.key(1), x)
  params = jax.tree.map(lambda p: p + 0.3, params)  # non-zero bias too
  np.testing.assert_allclose(shifted.apply(params, x), conv.apply(params, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 9, 7, 12), (1, 1, 1, 3), (2, 2, 5, 4), (1, 16, 32, 8)])
def test_shifted_depthwise_custom_gradient_equals_convolution_gradient(shape):
  """The hand-written VJP of the shifted form = autodiff of the grouped convolution."""
  x = jax.random.normal(jax.random.key(0), shape)
  g = jax.random.normal(jax.random.key(2), shape)
  conv, shifted = DepthwiseConv3x3(kernels="native"), DepthwiseConv3x3(kernels="cpu")
  params = jax.tree.map(lambda p: p + 0.3, conv.init(jax.random.key(1), x))
  out_c, vjp_c = jax.vjp(conv.apply, params, x)
  out_s, vjp_s = jax.vjp(jax.jit(shifted.apply), params, x)
  np.testing.assert_allclose(out_s, out_c, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(vjp_s(g)), jax.tree.leaves(vjp_c(g))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(2, 5, 7, 6), (3, 6), (1, 4, 6)])
def test_dense_over_a_2d_view_equals_plain_dense_with_its_gradients(shape):
  x = jax.random.normal(jax.random.key(0), shape)
  g = jax.random.normal(jax.random.key(1), shape[:-1] + (5,))
  flat, plain = nn.Dense(5, dot_general=kernels.dense_dot_general), nn.Dense(5)
  params = flat.init(jax.random.key(2), x)
  out, vjp = jax.vjp(jax.jit(flat.apply), params, x)
  ref, vjp_ref = jax.vjp(plain.apply, params, x)
  assert out.shape == ref.shape == g.shape
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
  for a, b in zip(jax.tree.leaves(vjp(g)), jax.tree.leaves(vjp_ref(g))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="last axis with a 2-D kernel"):
    kernels.dense_dot_general(x, jnp.ones((shape[0], 5)), (((0,), (0,)), ((), ())))


@pytest.mark.parametrize("size", [(16, 16), (13, 11)])
def test_patch_conv_equals_strided_convolution(size):
  x = jax.random.normal(jax.random.key(0), (2, *size, 6))
  module = PatchConv(features=5, ratio=4)
  params = module.init(jax.random.key(1), x)
  expected = (
    jax.lax.conv_general_dilated(
      x, params["params"]["kernel"], (4, 4), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    + params["params"]["bias"]
  )
  np.testing.assert_allclose(module.apply(params, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "tokens,context,heads,chunk_elements",
  [
    (37, 5, 1, 2 * 8 * 5),  # chunks of 8 queries, the last padded (37 = 4 x 8 + 5)
    (16, 16, 2, 1 << 19),  # one chunk
    (9, 128, 5, 2 * 2 * 5 * 128),
  ],
)  # chunks of 2 queries, the last padded
def test_softmax_attention_and_its_gradient_equal_dot_product_attention(
  tokens, context, heads, chunk_elements, monkeypatch
):
  monkeypatch.setattr(kernels, "_CHUNK_ELEMENTS", chunk_elements)
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (2, tokens, heads, 8)) * 2
  k = jax.random.normal(keys[1], (2, context, heads, 8))
  v = jax.random.normal(keys[2], (2, context, heads, 8))
  g = jax.random.normal(keys[3], (2, tokens, heads, 8))
  out, vjp = jax.vjp(jax.jit(softmax_attention), q, k, v)
  ref, vjp_ref = jax.vjp(jax.nn.dot_product_attention, q, k, v)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  for a, b in zip(vjp(g), vjp_ref(g)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_resize_rules_follow_pytorch_by_hand():
  # 2 -> 4, align_corners=False: src = (dst + .5) / 2 - .5, clamped at 0.
  np.testing.assert_allclose(bilinear_matrix(2, 4), [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
  # Nearest floors dst * in / out.
  np.testing.assert_array_equal(nearest_indices(3, 5), [0, 0, 1, 1, 2])
  np.testing.assert_array_equal(nearest_indices(5, 3), [0, 1, 3])


def _nearest_matrix(in_size, out_size):
  m = np.zeros((out_size, in_size), np.float32)
  m[np.arange(out_size), nearest_indices(in_size, out_size)] = 1.0
  return m


@pytest.mark.parametrize("form", ["cpu", "native"])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize(
  "src,dst",
  [
    ((4, 8), (16, 32)),
    ((8, 16), (64, 128)),
    ((5, 7), (17, 33)),
    ((9, 13), (4, 6)),
    ((6, 6), (6, 11)),
  ],
)
def test_resize_and_its_gradient_equal_the_dense_matrices(mode, src, dst, form):
  """Forward = A_h x A_w^T; the gradient = A_h^T g A_w, the exact transpose, in both kernel
  forms (cpu: gathers and a custom VJP; native: matrix contractions, repeats, autodiff)."""
  resize, matrix = {
    "bilinear": (resize_bilinear, bilinear_matrix),
    "nearest": (resize_nearest, _nearest_matrix),
  }[mode]
  x = jax.random.normal(jax.random.key(0), (2, *src, 3))
  g = jax.random.normal(jax.random.key(1), (2, *dst, 3))
  a_h, a_w = (matrix(i, o).astype(np.float64) for i, o in zip(src, dst))
  out, vjp = jax.vjp(lambda t: jax.jit(resize, static_argnums=(1, 2))(t, dst, form), x)
  expected = np.einsum("Hh,bhwc,Ww->bHWc", a_h, np.asarray(x, np.float64), a_w)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  expected_grad = np.einsum("Hh,bHWc,Ww->bhwc", a_h, np.asarray(g, np.float64), a_w)
  np.testing.assert_allclose(vjp(g)[0], expected_grad, rtol=1e-5, atol=1e-5)
  # Integer maps (labels) take the plain gather path, same indices.
  if mode == "nearest":
    labels = jnp.arange(src[0] * src[1]).reshape(1, *src)
    np.testing.assert_array_equal(
      resize(labels, dst, form)[0], (a_h @ np.asarray(labels[0], np.float64) @ a_w.T)
    )


def _reference_head(params, stats, features, num_classes):
  """The reference order: per-stage linear, upsample, concat(4, 3, 2, 1), 1x1 conv, BN (eval)."""
  size = features[0].shape[1:3]
  branches = []
  for stage in (3, 2, 1, 0):
    p = params[f"linear_c{stage + 1}"]
    y = features[stage] @ p["kernel"] + p["bias"]
    a_h = bilinear_matrix(y.shape[1], size[0])
    a_w = bilinear_matrix(y.shape[2], size[1])
    branches.append(jnp.einsum("Hh,bhwc,Ww->bHWc", a_h, y, a_w))
  x = jax.lax.conv_general_dilated(
    jnp.concatenate(branches, -1),
    params["linear_fuse"]["kernel"],
    (1, 1),
    "VALID",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  x = (x - stats["bn"]["mean"]) / jnp.sqrt(stats["bn"]["var"] + 1e-5)
  x = jnp.maximum(x * params["bn"]["scale"] + params["bn"]["bias"], 0.0)
  return x @ params["linear_pred"]["kernel"][0, 0] + params["linear_pred"]["bias"]


@pytest.mark.parametrize("size", [(16, 32), (17, 23)])
def test_head_equals_concatenate_then_fuse(size):
  """The head fuses per stage before upsampling: same function as concat + 1x1 conv."""
  shapes = [size]
  for _ in range(3):
    shapes.append(((shapes[-1][0] + 1) // 2, (shapes[-1][1] + 1) // 2))
  features = [
    jax.random.normal(jax.random.key(i), (2, *hw, c))
    for i, (hw, c) in enumerate(zip(shapes, (8, 16, 24, 32)))
  ]
  head = SegFormerHead(num_classes=5, width=16)
  variables = jax.jit(head.init)(jax.random.key(0), features)
  # Same parameter tree as the nn.Conv / nn.Dense formulation.
  shapes_tree = jax.tree.map(lambda p: p.shape, variables["params"])
  assert shapes_tree["linear_fuse"] == {"kernel": (1, 1, 64, 16)}
  assert shapes_tree["linear_pred"] == {"kernel": (1, 1, 16, 5), "bias": (5,)}
  assert shapes_tree["linear_c3"] == {"kernel": (24, 16), "bias": (16,)}
  variables = jax.tree.map(
    lambda p: p + 0.1 * jax.random.uniform(jax.random.key(7), p.shape), variables
  )
  out = jax.jit(head.apply)(variables, features)
  expected = _reference_head(variables["params"], variables["batch_stats"], features, 5)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_bad_input_is_named():
  with pytest.raises(ValueError, match="b7"):
    SegFormer("b7").init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
    SegFormer("b0").init(jax.random.key(0), jnp.zeros((1, 3, 32, 32)))


def test_linear_layers_start_like_timm_trunc_normal():
  """timm's trunc_normal_(std=.02) cuts at +-2 absolute (100 sigma): the std stays 0.02
  (flax's default +-2 sigma cut would give 0.0176), and no sample passes 2."""
  kernel = np.asarray(init.linear_kernel(jax.random.key(0), (512, 1024)))
  assert abs(kernel.std() / 0.02 - 1) < 0.02 and abs(kernel.mean()) < 1e-4
  assert np.abs(kernel).max() <= 2.0


def test_gelu_is_the_exact_erf_gelu_and_keeps_the_dtype():
  x = np.linspace(-9.0, 9.0, 721)
  expected = np.array([v * (1.0 + math.erf(v / math.sqrt(2.0))) / 2.0 for v in x])
  np.testing.assert_allclose(gelu(jnp.asarray(x, jnp.float32)), expected, rtol=2e-6, atol=1e-6)
  assert gelu(jnp.ones((2,), jnp.bfloat16)).dtype == jnp.bfloat16
  grad = jax.vmap(jax.grad(gelu))(jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(
    grad,
    jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(jnp.asarray(x, jnp.float32)),
    atol=2e-6,
  )


def test_rematerialised_blocks_keep_the_parameters_and_the_gradients():
  """config.remat: the same variables, the blocks under jax.checkpoint in the gradient's
  program, and the same gradients as without it."""
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(1, 32, 64, 3)), jnp.float32)
  plain = SegFormer(TINY_STUDENT, 5)
  variables = jax.jit(plain.init)(jax.random.key(0), x)

  def grad_fn(model):
    def loss(params):
      out, _ = model.apply(
        {**variables, "params": params},
        x,
        train=True,
        rngs={"dropout": jax.random.key(1)},
        mutable=["batch_stats"],
      )
      return jnp.sum(out["logits"] ** 2)

    return jax.grad(loss)

  remat = SegFormer(TINY_STUDENT, 5, remat="block")
  shapes = jax.eval_shape(remat.init, jax.random.key(0), x)
  assert jax.tree.structure(shapes) == jax.tree.structure(variables)

  def forward(model):
    return str(jax.make_jaxpr(lambda v: model.apply(v, x, method="encode"))(variables))

  assert "remat" in forward(remat) and "remat" not in forward(plain)  # jax.checkpoint's primitive
  want, got = (jax.jit(grad_fn(m))(variables["params"]) for m in (plain, remat))
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="remat='all': expected one of none, block"):
    archs.build("segformer", "b0", 19, remat="all")
