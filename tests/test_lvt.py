"""LVT: its pieces (CSA, unfold / fold, atrous depthwise conv, RASA) by hand, parameter names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_families import init_shapes, random_variables

from transkd_jax.models import LVT
from transkd_jax.models import lvt as lvt_lib

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
  variables = random_variables(module, x, scale=0.3)
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
  variables = random_variables(module, x, scale=0.3)
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
  variables = random_variables(module, x, scale=0.3)
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


def test_parameter_names():
  lvt = init_shapes(LVT("lvt", 19))["params"]
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
