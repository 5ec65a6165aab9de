"""PVTv2 (+ FPN neck and head) and LVT: sizes, parity with references, the contract."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from runs import TINY_LVT, TINY_PVT  # tiny rows with the real four-stage geometry

from transkd_jax.models import LVT, PVT_VARIANTS, PVTv2, archs
from transkd_jax.models import lvt as lvt_lib
from transkd_jax.models.pvtv2 import FPN, FPNHead, get_pvt_variant


def _apply(model, *args, **kwargs):
  """model.apply under jit (eager op-by-op dispatch is slow on CPU)."""
  static = tuple(k for k in ("train", "method", "mutable") if k in kwargs)
  return jax.jit(model.apply, static_argnames=static)(*args, **kwargs)


def _shapes(model, size=(64, 64)):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *size, 3))))


def _count(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _random_variables(module, *args, seed=0, scale=0.1):
  """Variables of ``module`` with random values, from abstract init (no init compile).

  Normal(0, scale) everywhere; LayerNorm / BatchNorm scales and BatchNorm variances
  1 + |normal(0, scale)|.
  """
  shapes = jax.eval_shape(module.init, jax.random.key(0), *args)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    x = rng.normal(scale=scale, size=leaf.shape).astype(leaf.dtype)
    if jax.tree_util.keystr(path).endswith(("['scale']", "['var']")):
      x = 1 + np.abs(x)
    return jnp.asarray(x)

  return jax.tree_util.tree_map_with_path(draw, shapes)


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
  shapes = _shapes(archs.build(arch, variant, num_classes))
  assert _count(shapes["params"]) == expected
  assert ("batch_stats" in shapes) == archs.has_batch_stats(arch)


def test_pvt_table_follows_public_backbones():
  assert get_pvt_variant("pvt_v2_b2") is PVT_VARIANTS["b2"] is get_pvt_variant("B2")
  for name, row in PVT_VARIANTS.items():
    assert row.heads == (1, 2, 5, 8) and row.sr_ratios == (8, 4, 2, 1)
    assert row.drop_path_rate == 0.1
    assert row.mlp_ratios == ((4, 4, 4, 4) if name == "b5" else (8, 8, 4, 4))
  assert [PVT_VARIANTS[f"b{i}"].depths for i in range(6)] == [
    (2, 2, 2, 2),
    (2, 2, 2, 2),
    (3, 4, 6, 3),
    (3, 4, 18, 3),
    (3, 8, 27, 3),
    (3, 6, 40, 3),
  ]
  assert PVT_VARIANTS["b0"].channels == (32, 64, 160, 256)
  assert {PVT_VARIANTS[f"b{i}"].channels for i in range(1, 6)} == {(64, 128, 320, 512)}


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
# PVTv2 encoder = HuggingFace's PvtV2Model
# --------------------------------------------------------------------------


def _hf_to_ours(state):
  """A PvtV2Model state dict -> our encoder params (test-side rename)."""
  flat = {}

  def put(path, value):
    flat[tuple(path.split("/"))] = np.asarray(value)

  conv = lambda w: w.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  for name, t in state.items():
    a = t.detach().numpy()
    m = re.fullmatch(r"encoder\.layers\.(\d)\.(.+)\.(weight|bias)", name)
    stage, rest, kind = int(m[1]) + 1, m[2], m[3]
    norm_leaf = "scale" if kind == "weight" else "bias"
    dense_leaf = "kernel" if kind == "weight" else "bias"
    dense = a.T if kind == "weight" else a
    if rest == "patch_embedding.proj":
      put(f"patch_embed{stage}/proj/{dense_leaf}", conv(a) if kind == "weight" else a)
    elif rest == "patch_embedding.layer_norm":
      put(f"patch_embed{stage}/norm/{norm_leaf}", a)
    elif rest == "layer_norm":
      put(f"norm{stage}/{norm_leaf}", a)
    else:
      b = re.fullmatch(r"blocks\.(\d+)\.(.+)", rest)
      block, part = f"block{stage}_{b[1]}", b[2]
      names = {
        "layer_norm_1": "norm1",
        "layer_norm_2": "norm2",
        "attention.layer_norm": "attn/norm",
        "attention.query": "attn/q",
        "attention.proj": "attn/proj",
        "mlp.dense1": "mlp/fc1",
        "mlp.dense2": "mlp/fc2",
      }
      if part in ("layer_norm_1", "layer_norm_2", "attention.layer_norm"):
        put(f"{block}/{names[part]}/{norm_leaf}", a)
      elif part in names:
        put(f"{block}/{names[part]}/{dense_leaf}", dense)
      elif part == "attention.spatial_reduction":
        put(f"{block}/attn/sr/{dense_leaf}", conv(a) if kind == "weight" else a)
      elif part == "mlp.dwconv.dwconv":
        put(f"{block}/mlp/dwconv/{dense_leaf}", conv(a) if kind == "weight" else a)
      elif part in ("attention.key", "attention.value"):
        flat.setdefault(("_kv", block, kind), {})[part] = dense
      else:
        raise KeyError(name)
  for key in [k for k in flat if k[0] == "_kv"]:
    parts = flat.pop(key)
    # Ours (as the public code): one kv layer, keys first.
    value = np.concatenate([parts["attention.key"], parts["attention.value"]], axis=-1)
    flat[(key[1], "attn", "kv", "kernel" if key[2] == "weight" else "bias")] = value
  from flax import traverse_util

  return traverse_util.unflatten_dict(flat)


@pytest.fixture(scope="module")
def hf_pvt_b0():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  config = transformers.PvtV2Config()  # its defaults are pvt_v2_b0's shapes
  b0 = PVT_VARIANTS["b0"]
  assert (
    tuple(config.hidden_sizes),
    tuple(config.depths),
    tuple(config.num_attention_heads),
    tuple(config.mlp_ratios),
    tuple(config.sr_ratios),
    config.qkv_bias,
    config.hidden_act,
  ) == (b0.channels, b0.depths, b0.heads, b0.mlp_ratios, b0.sr_ratios, True, "gelu")
  torch.manual_seed(0)
  model = transformers.PvtV2Model(config).eval()
  with torch.no_grad():  # non-trivial LayerNorm affines and biases too
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  # HF uses config.layer_norm_eps (1e-6) for every LayerNorm; the public code (and we)
  # use PyTorch's default 1e-5 in the patch embeddings and the spatial reduction.
  for name, module in model.named_modules():
    if name.endswith(("patch_embedding.layer_norm", "attention.layer_norm")):
      module.eps = 1e-5
  return model, _hf_to_ours(model.state_dict())


@pytest.mark.parametrize("size", [(70, 90)])  # 64x64: test_convert_pairs, through the CLI
def test_pvtv2_encoder_equals_huggingface(hf_pvt_b0, size):
  import torch

  hf, params = hf_pvt_b0
  images = np.random.default_rng(0).uniform(size=(2, *size, 3)).astype(np.float32)
  with torch.no_grad():
    # HF's stage outputs (hidden_states) include each stage's final LayerNorm, NCHW.
    ref = hf(
      torch.from_numpy(images.transpose(0, 3, 1, 2)), output_hidden_states=True
    ).hidden_states
  out = _apply(PVTv2("b0"), {"params": {"encoder": params}}, images, method="encode")
  # Within 2e-5 (the error is ~5e-6): HF's own 1e-6 in those two norms would give ~5e-5.
  for ours, theirs in zip(out["features"], ref):
    np.testing.assert_allclose(ours, theirs.numpy().transpose(0, 2, 3, 1), atol=2e-5, rtol=0)


# --------------------------------------------------------------------------
# FPN neck and FPNHead = a torch re-statement of the public forward
# --------------------------------------------------------------------------


def _torch_fpn_and_head(torch, neck, head, features):
  """FPN(in, 16, 4) + FPNHead (strides 4-32), eval: the public forward, written with F.*"""
  F = torch.nn.functional
  t = lambda a: torch.from_numpy(np.array(a))
  conv = lambda x, p, pad: F.conv2d(
    x, t(p["kernel"]).permute(3, 2, 0, 1), t(p["bias"]), padding=pad
  )
  inputs = [t(f).permute(0, 3, 1, 2) for f in features]
  laterals = [conv(x, neck[f"lateral_convs_{i}"], 0) for i, x in enumerate(inputs)]
  for i in range(3, 0, -1):
    laterals[i - 1] = laterals[i - 1] + F.interpolate(
      laterals[i], size=laterals[i - 1].shape[2:], mode="nearest"
    )
  outs = [conv(x, neck[f"fpn_convs_{i}"], 1) for i, x in enumerate(laterals)]
  output = None
  for i, x in enumerate(outs):
    for k in range(max(1, i)):
      x = F.relu(conv(x, head[f"scale_heads_{i}_{k}"], 1))
      if i > 0:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    output = (
      x
      if output is None
      else output + F.interpolate(x, size=output.shape[2:], mode="bilinear", align_corners=False)
    )
  return conv(output, head["conv_seg"], 0).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("form", ["cpu", "native"])
@pytest.mark.parametrize("size", [(16, 16), (18, 23)])
def test_fpn_neck_and_head_equal_torch_restatement(size, form):
  torch = pytest.importorskip("torch")
  grid = [size]
  for _ in range(3):
    grid.append(((grid[-1][0] + 1) // 2, (grid[-1][1] + 1) // 2))
  features = [
    jax.random.normal(jax.random.key(i), (2, *hw, c))
    for i, (hw, c) in enumerate(zip(grid, (4, 6, 8, 10)))
  ]
  neck = FPN(width=16, kernels=form)
  head = FPNHead(num_classes=5, channels=8, kernels=form)
  neck_vars = _random_variables(neck, features, seed=1)  # non-zero biases too
  mid = jax.jit(neck.apply)(neck_vars, features)
  assert [m.shape for m in mid] == [(2, *hw, 16) for hw in grid]
  head_vars = _random_variables(head, mid, seed=2)
  assert set(head_vars) == {"params"}  # no norm anywhere
  assert sorted(head_vars["params"]) == [
    "conv_seg",
    "scale_heads_0_0",
    "scale_heads_1_0",
    "scale_heads_2_0",
    "scale_heads_2_1",
    "scale_heads_3_0",
    "scale_heads_3_1",
    "scale_heads_3_2",
  ]
  out = jax.jit(head.apply)(head_vars, mid)
  assert out.shape == (2, *size, 5)
  expected = _torch_fpn_and_head(torch, neck_vars["params"], head_vars["params"], features)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------
# LVT pieces, by hand
# --------------------------------------------------------------------------


def test_ceil_mode_average_pool_by_hand():
  x = jnp.arange(15.0).reshape(1, 3, 5, 1)  # rows [0..4], [5..9], [10..14]
  out = lvt_lib.avg_pool_2x2_ceil(x)[0, :, :, 0]
  expected = [
    [(0 + 1 + 5 + 6) / 4, (2 + 3 + 7 + 8) / 4, (4 + 9) / 2],
    [(10 + 11) / 2, (12 + 13) / 2, 14.0],
  ]  # edge windows: in-bounds pixels only
  np.testing.assert_allclose(out, expected)
  torch = pytest.importorskip("torch")
  y = np.random.default_rng(0).normal(size=(2, 7, 6, 3)).astype(np.float32)
  ref = torch.nn.AvgPool2d(2, 2, ceil_mode=True)(torch.from_numpy(y).permute(0, 3, 1, 2))
  np.testing.assert_allclose(
    lvt_lib.avg_pool_2x2_ceil(y), ref.permute(0, 2, 3, 1).numpy(), rtol=1e-6, atol=1e-6
  )


def test_unfold_fold_by_hand():
  # 5 x 6, kernel 3, pad 1, stride 2: 3 x 3 patches; patch i covers rows 2i-1 .. 2i+1.
  ones = jnp.ones((1, 5, 6, 2))
  patches = lvt_lib.unfold(ones)
  assert patches.shape == (1, 3, 3, 9, 2)
  counts = lvt_lib.fold(patches, (5, 6))[0, :, :, 0]
  rows = np.array([1, 2, 1, 2, 1])  # how many patches cover each row
  cols = np.array([1, 2, 1, 2, 1, 1])  # the last patch column hangs into the padding
  np.testing.assert_array_equal(counts, np.outer(rows, cols))
  # Slot k = 3 ki + kj of patch (i, j) reads x_pad[2i + ki, 2j + kj].
  x = jax.random.normal(jax.random.key(0), (2, 5, 6, 3))
  padded = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
  p = np.asarray(lvt_lib.unfold(x))
  assert p[1, 2, 1, 3 * 2 + 0, 1] == padded[1, 4 + 2, 2 + 0, 1]
  assert p[0, 0, 0, 0].tolist() == [0, 0, 0]
  # fold is unfold's linear transpose.
  g = jax.random.normal(jax.random.key(1), p.shape)
  (transposed,) = jax.linear_transpose(lvt_lib.unfold, x)(g)
  np.testing.assert_allclose(lvt_lib.fold(g, (5, 6)), transposed, rtol=1e-6, atol=1e-6)
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  tg = torch.from_numpy(np.array(g)).permute(0, 4, 3, 1, 2).reshape(2, 27, 9)  # (N, C*9, L)
  ref = F.fold(tg, (5, 6), kernel_size=3, padding=1, stride=2).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(lvt_lib.fold(g, (5, 6)), ref, rtol=1e-5, atol=1e-5)


def _softmax(a):
  e = np.exp(a - a.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _csa_loops(x, p, heads):
  """CSA written out pixel by pixel (float64)."""
  batch, height, width, c = x.shape
  hd = c // heads
  h, w = -(-height // 2), -(-width // 2)
  weight = p["weight"]["kernel"][0, 0]  # (C, 9C): slot k maps through weight[:, k*C:(k+1)*C]
  out = np.zeros_like(x)
  for b in range(batch):
    for i in range(h):
      for j in range(w):
        window = x[b, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2]
        pooled = window.reshape(-1, c).mean(0)
        logits = (pooled @ p["attn"]["kernel"] + p["attn"]["bias"]).reshape(heads, 9, 9)
        attn = _softmax(logits * hd**-0.5)
        pixels = []
        values = np.zeros((9, c))
        for k in range(9):
          r, s = 2 * i - 1 + k // 3, 2 * j - 1 + k % 3
          pixels.append((r, s))
          if 0 <= r < height and 0 <= s < width:
            values[k] = x[b, r, s] @ weight[:, k * c : (k + 1) * c]
        for k, (r, s) in enumerate(pixels):
          if 0 <= r < height and 0 <= s < width:
            for n in range(heads):
              out[b, r, s, n * hd : (n + 1) * hd] += attn[n, k] @ values[:, n * hd : (n + 1) * hd]
  return out @ p["proj"]["kernel"] + p["proj"]["bias"]


def test_csa_equals_pixel_loops():
  x = jax.random.normal(jax.random.key(0), (1, 5, 6, 4))
  module = lvt_lib.CSA(num_heads=2)
  variables = _random_variables(module, x, scale=0.3)
  shapes = jax.tree.map(lambda p: p.shape, variables["params"])
  assert shapes == {
    "attn": {"kernel": (4, 162), "bias": (162,)},
    "weight": {"kernel": (1, 1, 4, 36)},
    "proj": {"kernel": (4, 4), "bias": (4,)},
  }
  p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  np.testing.assert_allclose(
    jax.jit(module.apply)(variables, x),
    _csa_loops(np.asarray(x, np.float64), p64, 2),
    rtol=1e-5,
    atol=1e-5,
  )


@pytest.mark.parametrize("form", ["cpu", "native"])
def test_atrous_depthwise_equals_dilated_convolutions(form):
  x = jax.random.normal(jax.random.key(0), (2, 7, 9, 6))
  module = lvt_lib.AtrousDepthwise((1, 3, 5), kernels=form)
  variables = _random_variables(module, x, scale=0.3)
  kernel = variables["params"]["kernel"]
  assert kernel.shape == (3, 3, 1, 6)  # ONE kernel for the three rates, no bias
  expected = sum(
    jax.nn.silu(
      jax.lax.conv_general_dilated(
        x,
        kernel,
        (1, 1),
        ((d, d), (d, d)),
        rhs_dilation=(d, d),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=6,
      )
    )
    for d in (1, 3, 5)
  )
  out, vjp = jax.vjp(jax.jit(module.apply), variables, x)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  torch = pytest.importorskip("torch")
  tx = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)
  tw = torch.from_numpy(np.array(kernel)).permute(3, 2, 0, 1)
  ref = sum(
    torch.nn.functional.silu(torch.nn.functional.conv2d(tx, tw, padding=d, dilation=d, groups=6))
    for d in (1, 3, 5)
  )
  np.testing.assert_allclose(out, ref.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5)
  # Both forms have the same gradient.
  other = lvt_lib.AtrousDepthwise((1, 3, 5), kernels="native" if form == "cpu" else "cpu")
  g = jax.random.normal(jax.random.key(3), out.shape)
  _, vjp_other = jax.vjp(jax.jit(other.apply), variables, x)
  for a, b in zip(jax.tree.leaves(vjp(g)), jax.tree.leaves(vjp_other(g))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def _layer_norm(x, p, eps=1e-5):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _rasa_inner(x, p, heads, sr):
  """One RASA attention pass in numpy (float64)."""
  silu = lambda t: t / (1 + np.exp(-t))
  batch, height, width, c = x.shape
  q = x @ p["q"]["kernel"]
  kernel = p["ds"]["kernel"][:, :, 0]
  ds = 0
  for d in (1, 3, 5):
    padded = np.pad(q, ((0, 0), (d, d), (d, d), (0, 0)))
    conv = sum(
      padded[:, a * d : a * d + height, b * d : b * d + width] * kernel[a, b]
      for a in range(3)
      for b in range(3)
    )
    ds = ds + silu(conv)
  context = x
  if sr > 1:
    h, w = height // sr, width // sr
    patches = x[:, : h * sr, : w * sr].reshape(batch, h, sr, w, sr, c)
    context = np.einsum("bhiwjc,ijcd->bhwd", patches, p["sr"]["kernel"]) + p["sr"]["bias"]
    context = _layer_norm(context, p["norm"])
  kv = context.reshape(batch, -1, c) @ p["kv"]["kernel"]
  k, v = kv[..., :c], kv[..., c:]
  hd = c // heads
  q = ds.reshape(batch, -1, heads, hd)
  k, v = k.reshape(batch, -1, heads, hd), v.reshape(batch, -1, heads, hd)
  attn = _softmax(np.einsum("bqnd,bknd->bnqk", q, k) * hd**-0.5)
  out = np.einsum("bnqk,bknd->bqnd", attn, v).reshape(batch, height, width, c)
  return out @ p["proj"]["kernel"] + p["proj"]["bias"]


@pytest.mark.parametrize("sr", [1, 2])
def test_rasa_recursion(sr):
  x = jax.random.normal(jax.random.key(0), (2, 5, 6, 8))
  module = lvt_lib.RecursiveAtrousAttention(num_heads=2, sr_ratio=sr)
  variables = _random_variables(module, x, scale=0.3)
  assert sorted(variables["params"]) == sorted(
    ["q", "ds", "kv", "proj"] + (["sr", "norm"] if sr > 1 else [])
  )
  assert "bias" not in variables["params"]["q"] and "bias" not in variables["params"]["kv"]
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  x64 = np.asarray(x, np.float64)
  silu = lambda t: t / (1 + np.exp(-t))
  # r_num = 2: y = silu(inner(x)); y = silu(inner(y + x)).
  expected = silu(_rasa_inner(silu(_rasa_inner(x64, p, 2, sr)) + x64, p, 2, sr))
  np.testing.assert_allclose(jax.jit(module.apply)(variables, x), expected, rtol=1e-5, atol=1e-5)
  # The XLA:CPU forms (shifted multiply-adds, chunked attention) compute the same.
  cpu = lvt_lib.RecursiveAtrousAttention(num_heads=2, sr_ratio=sr, kernels="cpu")
  np.testing.assert_allclose(jax.jit(cpu.apply)(variables, x), expected, rtol=1e-5, atol=1e-5)
  # r_num = 1: one pass, no SiLU; same parameters.
  single = lvt_lib.RecursiveAtrousAttention(num_heads=2, sr_ratio=sr, recursions=1)
  np.testing.assert_allclose(
    jax.jit(single.apply)(variables, x), _rasa_inner(x64, p, 2, sr), rtol=1e-5, atol=1e-5
  )


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
  variables = _shapes(model, size)
  images = jax.ShapeDtypeStruct((2, *size, 3), jnp.float32)
  out = jax.eval_shape(model.apply, variables, images)
  grid = _grid(size)
  assert out["logits"].shape == (2, *grid[0], 19) and out["logits"].dtype == jnp.float32
  for i, c in enumerate(channels):
    assert out["features"][i].shape == (2, *grid[i], c)
    assert out["embeddings"][i].shape == (2, grid[i][0] * grid[i][1], c)


def test_parameter_names():
  lvt = _shapes(LVT("lvt", 19))["params"]
  assert sorted(lvt) == ["encoder", "head"]
  assert sorted(lvt["encoder"]) == sorted(
    [f"patch_embed{s}" for s in range(1, 5)]
    + [f"block{s}_{b}" for s in range(1, 5) for b in range(2)]
  )
  assert sorted(lvt["head"]) == [
    "bn",
    "linear_c1",
    "linear_c2",
    "linear_c3",
    "linear_c4",
    "linear_fuse",
    "linear_pred",
  ]
  csa, rasa = lvt["encoder"]["block1_0"], lvt["encoder"]["block2_1"]
  assert sorted(csa) == ["attn", "mlp", "norm1", "norm2"]
  assert sorted(csa["attn"]) == ["attn", "proj", "weight"] and sorted(csa["mlp"]) == ["fc1", "fc2"]
  assert sorted(rasa["attn"]) == ["ds", "kv", "norm", "proj", "q", "sr"]
  assert sorted(rasa["mlp"]) == ["dwconv", "fc1", "fc2"]
  assert rasa["mlp"]["fc1"]["kernel"].shape == (64, 512)  # mlp ratio 8
  assert sorted(lvt["encoder"]["block4_0"]["attn"]) == ["ds", "kv", "proj", "q"]  # sr 1
  pvt = _shapes(PVTv2("b0", 19))["params"]
  assert sorted(pvt) == ["encoder", "head", "neck"]
  assert sorted(pvt["neck"]) == sorted(
    [f"lateral_convs_{i}" for i in range(4)] + [f"fpn_convs_{i}" for i in range(4)]
  )
  assert pvt["encoder"]["block1_0"]["mlp"]["fc1"]["kernel"].shape == (32, 256)  # ratio 8
  assert pvt["encoder"]["block3_0"]["mlp"]["fc1"]["kernel"].shape == (160, 640)  # ratio 4
  assert pvt["encoder"]["block1_0"]["attn"]["q"]["bias"].shape == (32,)  # qkv bias


@pytest.mark.parametrize(
  "make",
  [lambda **k: PVTv2(TINY_PVT, 5, **k), lambda **k: LVT(TINY_LVT, 5, **k)],
  ids=["pvtv2", "lvt"],
)
def test_encode_matches_call(make):
  model = make()
  images = jax.random.uniform(jax.random.key(1), (2, 64, 64, 3))
  variables = _random_variables(model, images)
  full = _apply(model, variables, images)
  assert full["logits"].shape == (2, 16, 16, 5)
  assert np.isfinite(np.asarray(full["logits"])).all()
  # Encoding needs no neck or head parameters at all.
  enc = _apply(
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
