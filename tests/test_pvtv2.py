"""PVTv2 (+ FPN neck and head): its variant table, parity with references, parameter names."""

import re

import jax
import numpy as np
import pytest
from flax import traverse_util
from model_families import apply_jit, init_shapes, random_variables

from transkd_jax.models import PVT_VARIANTS, PVTv2
from transkd_jax.models.pvtv2 import FPN, FPNHead, get_pvt_variant


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
  out = apply_jit(PVTv2("b0"), {"params": {"encoder": params}}, images, method="encode")
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
  neck_vars = random_variables(neck, features, seed=1)  # non-zero biases too
  mid = jax.jit(neck.apply)(neck_vars, features)
  assert [m.shape for m in mid] == [(2, *hw, 16) for hw in grid]
  head_vars = random_variables(head, mid, seed=2)
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


def test_parameter_names():
  pvt = init_shapes(PVTv2("b0", 19))["params"]
  assert sorted(pvt) == ["encoder", "head", "neck"]
  assert sorted(pvt["neck"]) == sorted(
    [f"lateral_convs_{i}" for i in range(4)] + [f"fpn_convs_{i}" for i in range(4)]
  )
  assert pvt["encoder"]["block1_0"]["mlp"]["fc1"]["kernel"].shape == (32, 256)  # ratio 8
  assert pvt["encoder"]["block3_0"]["mlp"]["fc1"]["kernel"].shape == (160, 640)  # ratio 4
  assert pvt["encoder"]["block1_0"]["attn"]["q"]["bias"].shape == (32,)  # qkv bias
