"""Weight import for the extra pairs' models: PVTv2 (+ FPN) and LVT.

HuggingFace PvtV2 parity through the CLI; the public code's layouts (official
ImageNet encoders, the public PVTv2 wrapper and LVT, DataParallel / distillation
prefixes, 20 -> 19 classes) converted exactly; every problem listed at once;
converted trees load with ``build.read_model``.

The public layouts are built here from our own random variables through the
name table (``to_public_state_dict``), and the table is pinned to the
public code's names and shapes (``test_public_names_are_the_reference_ones``,
written down from ``build_pvts('pvt_v2_b0', 20).state_dict()`` and
``lvt(rasa_cfg).state_dict()`` of github RuipingL/TransKD).
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from transkd_jax import build, convert
from transkd_jax.errors import UserError
from transkd_jax.models import archs
from transkd_jax.models import lvt as lvt_lib
from transkd_jax.weights.decoder import fresh_decoder
from transkd_jax.weights.infer import guess_arch
from transkd_jax.weights.layouts import to_flax_layout, to_public_state_dict, torch_name
from transkd_jax.weights.names import source_format
from transkd_jax.weights.readers import read_state_dict
from transkd_jax.weights.record import META_FILE
from transkd_jax.weights.to_flax import to_flax_variables

torch = pytest.importorskip("torch", reason="torch is not installed (pip install -e \".[test]\")")
transformers = pytest.importorskip(
  "transformers", reason="transformers is not installed (pip install -e \".[test]\")"
)
ocp = pytest.importorskip("orbax.checkpoint")

_quiet = lambda *_: None


def _random_variables(family, variant, num_classes, seed=0):
  """Full-size variables with random values, from abstract init only (no compile)."""
  model = archs.build(family, variant, num_classes)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  rng = np.random.default_rng(seed)
  flat = {}
  for path, leaf in traverse_util.flatten_dict(shapes).items():
    value = rng.normal(scale=0.1, size=leaf.shape).astype(np.float32)
    if path[-1] in ("scale", "var"):
      value = 1 + np.abs(value)
    flat[path] = value
  return traverse_util.unflatten_dict(flat)


@pytest.fixture(scope="module")
def pvt_b0():
  return _random_variables("pvtv2", "b0", 20, seed=1)


@pytest.fixture(scope="module")
def lvt20():
  return _random_variables("lvt", "lvt", 20, seed=2)


def _flat(tree):
  return traverse_util.flatten_dict(jax.tree.map(np.asarray, tree))


def _assert_same(a, b, skip=()):
  a, b = _flat(a), _flat(b)
  assert set(a) == set(b)
  for key in a:
    if not any(key[: len(s)] == s for s in skip):
      np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))


def _save_torch(state, path, wrap=None):
  tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
  torch.save({wrap: tensors, "epoch": 3} if wrap else tensors, path)
  return str(path)


# --------------------------------------------------------------------------
# HuggingFace PvtV2 (the acceptance test)
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_b0(tmp_path_factory):
  """A random HF PvtV2Model with the b0 config, saved with save_pretrained."""
  config = transformers.PvtV2Config()  # its defaults are pvt_v2_b0's shapes
  torch.manual_seed(0)
  model = transformers.PvtV2Model(config).eval()
  with torch.no_grad():  # non-trivial LayerNorm affines and biases too
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  directory = tmp_path_factory.mktemp("hf") / "pvt_v2_b0"
  model.save_pretrained(directory)
  # HF uses config.layer_norm_eps (1e-6) for every LayerNorm; the public PVTv2 code
  # (and we) use PyTorch's default 1e-5 in the patch embeddings' and the spatial
  # reductions' norms. The saved weights carry no eps: set HF's to the public code's
  # before comparing (HF's own 1e-6 there moves the features by ~5e-5).
  for name, module in model.named_modules():
    if name.endswith(("patch_embedding.layer_norm", "attention.layer_norm")):
      module.eps = 1e-5
  return model, directory


def test_huggingface_pvtv2_through_the_cli(tmp_path, capsys, hf_b0):
  hf, directory = hf_b0
  out = tmp_path / "ckpt"
  assert convert.main([f"--input={directory}", "--arch=pvt_v2_b0", f"--output={out}"]) == 0
  printed = capsys.readouterr().out
  assert "the neck and the head (19 classes) freshly initialised with seed 0" in printed
  meta = json.loads((out / META_FILE).read_text())
  assert (meta["arch"], meta["family"], meta["variant"], meta["num_classes"]) == (
    "pvt_v2_b0",
    "pvtv2",
    "b0",
    19,
  )
  assert (meta["source_format"], meta["normalization"]) == ("huggingface", "imagenet")
  # It loads as the rest of the code loads a model (PVTv2: no batch_stats).
  variables, _ = build.read_model(
    str(out), "config.student.checkpoint", meta["family"], meta["variant"], meta["num_classes"]
  )
  assert "batch_stats" not in variables

  model = archs.build("pvtv2", "b0", 19)
  images = np.random.default_rng(0).uniform(size=(2, 64, 96, 3)).astype(np.float32)
  ours = jax.jit(model.apply, static_argnames="method")(variables, images, method="encode")
  with torch.no_grad():
    theirs = hf(
      torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), output_hidden_states=True
    ).hidden_states  # NCHW, after each stage's norm
  assert len(theirs) == 4
  errors = [
    np.abs(np.asarray(a) - b.numpy().transpose(0, 2, 3, 1)).max()
    for a, b in zip(ours["features"], theirs)
  ]
  assert max(errors) < 1e-4, errors


def test_huggingface_pvtv2_classification_layout(hf_b0):
  """PvtV2ForImageClassification: the encoder under pvt_v2., the classifier dropped."""
  hf, directory = hf_b0
  plain = read_state_dict(str(directory))
  state = {f"pvt_v2.{k}": v for k, v in plain.items()}
  state["classifier.weight"] = np.zeros((1000, 256), np.float32)
  state["classifier.bias"] = np.zeros(1000, np.float32)
  log = []
  tree, classes = to_flax_variables(state, "pvt_v2_b0", log=log.append)
  assert classes == 19
  assert any("ImageNet classifier" in line and "classifier.weight" in line for line in log)
  reference, _ = to_flax_variables(plain, "pvt_v2_b0", log=_quiet)
  _assert_same(tree["params"]["encoder"], reference["params"]["encoder"])
  kv = tree["params"]["encoder"]["block2_1"]["attn"]["kv"]["kernel"]
  hf_block = "encoder.layers.1.blocks.1.attention."
  np.testing.assert_array_equal(
    kv, np.concatenate([plain[hf_block + "key.weight"].T, plain[hf_block + "value.weight"].T], 1)
  )
  assert source_format(state) == ("huggingface", "imagenet")


# --------------------------------------------------------------------------
# The public code's names and layouts
# --------------------------------------------------------------------------


def test_public_names_are_the_reference_ones(pvt_b0, lvt20):
  pvt = to_public_state_dict(pvt_b0, "pvtv2")
  assert len(pvt) == 208  # 176 backbone, 16 neck, 16 head; no buffers
  assert sum(k.startswith("backbone.") for k in pvt) == 176
  for name, shape in [
    ("backbone.patch_embed1.proj.weight", (32, 3, 7, 7)),
    ("backbone.block1.0.attn.kv.weight", (64, 32)),
    ("backbone.block1.0.attn.sr.weight", (32, 32, 8, 8)),
    ("backbone.block1.0.mlp.fc1.weight", (256, 32)),
    ("backbone.block1.0.mlp.dwconv.dwconv.weight", (256, 1, 3, 3)),
    ("backbone.norm4.bias", (256,)),
    ("neck.lateral_convs.0.conv.weight", (256, 32, 1, 1)),
    ("neck.fpn_convs.3.conv.bias", (256,)),
    ("head.scale_heads.0.0.conv.weight", (128, 256, 3, 3)),
    ("head.scale_heads.3.4.conv.weight", (128, 128, 3, 3)),
    ("head.conv_seg.weight", (20, 128, 1, 1)),
  ]:
    assert pvt[name].shape == shape, name
  assert not any(k.startswith(("head.scale_heads.1.2", "head.scale_heads.0.2")) for k in pvt)

  lvt = to_public_state_dict(lvt20, "lvt")
  assert len(lvt) == 164  # 148 backbone + the head, num_batches_tracked included
  assert sum(k.startswith("backbone.") for k in lvt) == 148
  for name, shape in [
    ("backbone.0.0.proj.weight", (64, 3, 7, 7)),
    ("backbone.0.1.0.attn.attn.weight", (162, 64)),
    ("backbone.0.1.0.attn.weight.weight", (576, 64, 1, 1)),  # 1x1 conv in 9 groups
    ("backbone.0.1.0.mlp.fc1.weight", (256, 64)),  # stage 1: Linear
    ("backbone.1.1.0.attn.q.weight", (64, 64)),
    ("backbone.1.1.0.attn.ds.weight", (64, 1, 3, 3)),
    ("backbone.1.1.0.attn.sr.weight", (64, 64, 4, 4)),
    ("backbone.1.1.0.mlp.fc1.weight", (512, 64, 1, 1)),  # stages 2-4: 1x1 conv
    ("backbone.1.1.0.mlp.depconv.weight", (512, 1, 3, 3)),
    ("backbone.3.1.1.mlp.fc2.weight", (256, 1024, 1, 1)),
    ("linear_c1.proj.weight", (256, 64)),
    ("linear_fuse.conv.weight", (256, 1024, 1, 1)),
    ("linear_fuse.bn.running_var", (256,)),
    ("linear_fuse.bn.num_batches_tracked", ()),
    ("linear_pred.weight", (20, 256, 1, 1)),
  ]:
    assert lvt[name].shape == shape, name
  assert "backbone.3.1.0.attn.sr.weight" not in lvt  # sr ratio 1


def _torch_csa(x, sd, heads):
  """The public CSA's forward (train/models/lvt/backbone.py), restated; x NHWC."""
  F = torch.nn.functional
  b, height, width, c = x.shape
  h, w = math.ceil(height / 2), math.ceil(width / 2)
  attn = F.avg_pool2d(x.permute(0, 3, 1, 2), 2, 2, ceil_mode=True).permute(0, 2, 3, 1)
  attn = (
    F.linear(attn, sd["attn.weight"], sd["attn.bias"])
    .reshape(b, h * w, heads, 9, 9)
    .permute(0, 2, 1, 3, 4)
  )
  attn = (attn * (c // heads) ** -0.5).softmax(dim=-1)
  v = (
    F.unfold(x.permute(0, 3, 1, 2), 3, padding=1, stride=2)
    .reshape(b, c, 9, h * w)
    .permute(0, 3, 2, 1)
    .reshape(b * h * w, 9 * c, 1, 1)
  )
  v = F.conv2d(v, sd["weight.weight"], groups=9)
  v = v.reshape(b, h * w, 9, heads, c // heads).permute(0, 3, 1, 2, 4)
  out = (attn @ v).permute(0, 1, 4, 3, 2).reshape(b, c * 9, h * w)
  out = F.fold(out, (height, width), 3, padding=1, stride=2)
  return F.linear(out.permute(0, 2, 3, 1), sd["proj.weight"], sd["proj.bias"])


def test_layouts_numerically():
  """CSA's grouped 1x1 conv (9C, C, 1, 1) -> (1, 1, C, 9C), a 1x1 conv into a Dense kernel,
  a depthwise conv (C, 1, 3, 3) -> (3, 3, 1, C): what the public modules compute."""
  F = torch.nn.functional
  torch.manual_seed(0)
  c, heads = 6, 2
  sd = {
    "attn.weight": 0.3 * torch.randn(81 * heads, c),
    "attn.bias": 0.3 * torch.randn(81 * heads),
    "weight.weight": 0.3 * torch.randn(9 * c, c, 1, 1),
    "proj.weight": 0.3 * torch.randn(c, c),
    "proj.bias": 0.3 * torch.randn(c),
  }
  x = torch.randn(2, 5, 7, c)
  module = lvt_lib.CSA(num_heads=heads)
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros(x.shape))
  prefix = "backbone.0.1.0.attn."
  flat = {}
  for path, leaf in traverse_util.flatten_dict(shapes).items():
    name = torch_name(("params", "encoder", "block1_0", "attn") + path[1:], "lvt")
    assert name.startswith(prefix)
    flat[path] = to_flax_layout(sd[name[len(prefix) :]].numpy(), len(leaf.shape))
    assert flat[path].shape == leaf.shape
  ours = jax.jit(module.apply)(traverse_util.unflatten_dict(flat), x.numpy())
  np.testing.assert_allclose(ours, _torch_csa(x, sd, heads).numpy(), atol=1e-5, rtol=1e-5)

  weight = torch.randn(5, c, 1, 1)  # LVT's Mix-FFN fc1: a 1x1 conv
  dense = to_flax_layout(weight.numpy(), 2)
  np.testing.assert_allclose(
    x.numpy() @ dense,
    F.conv2d(x.permute(0, 3, 1, 2), weight).permute(0, 2, 3, 1).numpy(),
    atol=1e-5,
  )
  depthwise = torch.randn(c, 1, 3, 3)
  kernel = to_flax_layout(depthwise.numpy(), 4)
  ours = jax.lax.conv_general_dilated(
    x.numpy(),
    kernel,
    (1, 1),
    ((1, 1), (1, 1)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=c,
  )
  np.testing.assert_allclose(
    ours,
    F.conv2d(x.permute(0, 3, 1, 2), depthwise, padding=1, groups=c).permute(0, 2, 3, 1).numpy(),
    atol=1e-5,
  )


def test_public_pvtv2_teacher_with_module_prefix_into_19_classes(tmp_path, pvt_b0):
  """A DataParallel PVTv2 wrapper's state dict (module.backbone/neck/head), 20 -> 19."""
  state = {f"module.{k}": v for k, v in to_public_state_dict(pvt_b0, "pvtv2").items()}
  path = _save_torch(state, tmp_path / "pvtv2b2_teacher_cityscapes.pth.tar", wrap="state_dict")
  log = []
  read = read_state_dict(path)
  tree, classes = to_flax_variables(read, "pvt_v2_b0", 19, log=log.append)
  assert classes == 19 and any("dropped row 19 of head.conv_seg" in line for line in log)
  _assert_same(tree, pvt_b0, skip=[("params", "head", "conv_seg")])
  for leaf in ("kernel", "bias"):
    np.testing.assert_array_equal(
      tree["params"]["head"]["conv_seg"][leaf], pvt_b0["params"]["head"]["conv_seg"][leaf][..., :19]
    )
  assert source_format(read) == ("public", "unit")
  # The 20-way head kept when no --num-classes is given.
  tree, classes = to_flax_variables(read, "pvt_v2_b0", log=_quiet)
  assert classes == 20
  _assert_same(tree, pvt_b0)


def test_official_pvtv2_imagenet_encoder_gets_a_fresh_neck_and_head(tmp_path, capsys, pvt_b0):
  public = to_public_state_dict(pvt_b0, "pvtv2")
  state = {k[len("backbone.") :]: v for k, v in public.items() if k.startswith("backbone.")}
  state["head.weight"] = np.zeros((1000, 256), np.float32)  # the ImageNet classifier
  state["head.bias"] = np.zeros(1000, np.float32)
  path = _save_torch(state, tmp_path / "pvt_v2_b0.pth")
  out = tmp_path / "ckpt"
  assert convert.main([f"--input={path}", "--arch=pvt_v2_b0", f"--output={out}", "--seed=3"]) == 0
  printed = capsys.readouterr().out
  assert "ImageNet classifier): head.bias, head.weight" in printed
  assert "freshly initialised with seed 3" in printed
  meta = json.loads((out / META_FILE).read_text())
  assert (meta["source_format"], meta["normalization"]) == ("public", "imagenet")
  variables, _ = build.read_model(str(out), "--checkpoint", "pvtv2", "b0", 19)
  _assert_same(variables["params"]["encoder"], pvt_b0["params"]["encoder"])
  # The decoder is the model's own initialisation, from --seed.
  fresh = fresh_decoder(archs.ARCHS["pvtv2"].get_variant("b0"), 19, 3, "pvtv2")
  assert sorted(fresh["params"]) == ["head", "neck"]
  _assert_same({k: variables["params"][k] for k in ("neck", "head")}, fresh["params"])
  assert variables["params"]["head"]["conv_seg"]["kernel"].shape == (1, 1, 128, 19)


def test_lvt_imagenet_encoder_gets_a_fresh_head(tmp_path, capsys, lvt20):
  public = to_public_state_dict(lvt20, "lvt")
  state = {k: v for k, v in public.items() if k.startswith("backbone.")}
  state.update(
    {
      "norm.weight": np.ones(256, np.float32),
      "norm.bias": np.zeros(256, np.float32),
      "head.weight": np.zeros((1000, 256), np.float32),
      "head.bias": np.zeros(1000, np.float32),
    }
  )  # a classifier's, if present
  path = _save_torch(state, tmp_path / "lvt_imagenet_pretrained.pth.tar")
  out = tmp_path / "ckpt"
  assert convert.main([f"--input={path}", "--arch=lvt", f"--output={out}"]) == 0
  printed = capsys.readouterr().out
  assert "dropped 4 tensors (LVT's ImageNet classifier" in printed
  assert "the head (19 classes) freshly initialised" in printed
  meta = json.loads((out / META_FILE).read_text())
  assert (meta["arch"], meta["family"], meta["variant"]) == ("lvt", "lvt", "lvt")
  assert (meta["source_format"], meta["normalization"]) == ("public", "imagenet")
  variables, _ = build.read_model(str(out), "--checkpoint", "lvt", "lvt", 19)
  _assert_same(variables["params"]["encoder"], lvt20["params"]["encoder"])
  np.testing.assert_array_equal(variables["batch_stats"]["head"]["bn"]["var"], np.ones(256))
  assert variables["params"]["head"]["linear_pred"]["kernel"].shape == (1, 1, 256, 19)


def test_public_lvt_student_with_batchnorm_statistics(tmp_path, lvt20):
  """The distillation wrapper's LVT student (module.student.*), CSF / PEA beside, 20 -> 19."""
  state = {f"module.student.{k}": v for k, v in to_public_state_dict(lvt20, "lvt").items()}
  state["module.student.linear_fuse.bn.num_batches_tracked"] = np.array(1234)
  state["module.skfs.0.conv1.0.weight"] = np.zeros((64, 256, 1, 1), np.float32)
  state["module.embed1_linearproject.weight"] = np.zeros((64, 64), np.float32)
  path = _save_torch(state, tmp_path / "model_best.pth")
  log = []
  read = read_state_dict(path)
  tree, classes = to_flax_variables(read, "lvt", 19, log=log.append)
  assert classes == 19
  assert any("training-time modules" in line for line in log)
  assert any("embed1_linearproject.weight, skfs.0.conv1.0.weight" in line for line in log)
  _assert_same(tree, lvt20, skip=[("params", "head", "linear_pred")])
  np.testing.assert_array_equal(
    tree["params"]["head"]["linear_pred"]["kernel"],
    lvt20["params"]["head"]["linear_pred"]["kernel"][..., :19],
  )
  assert sorted(tree["batch_stats"]["head"]["bn"]) == ["mean", "var"]
  assert source_format(read) == ("transkd", "unit")


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


def test_every_problem_is_listed_at_once(tmp_path, capsys, pvt_b0):
  state = to_public_state_dict(pvt_b0, "pvtv2")
  for name in ("backbone.block2.1.mlp.fc2.bias", "neck.fpn_convs.2.conv.weight"):
    del state[name]
  state["neck.extra_convs.0.conv.weight"] = np.zeros((3,), np.float32)
  state["backbone.block9.0.surprise.weight"] = np.zeros((3,), np.float32)
  state["backbone.norm2.weight"] = np.zeros(65, np.float32)
  state["head.scale_heads.2.2.conv.bias"] = np.zeros(64, np.float32)
  path = _save_torch(state, tmp_path / "broken.pth")
  out = tmp_path / "never"
  assert convert.main([f"--input={path}", "--arch=pvt_v2_b0", f"--output={out}"]) == 2
  message = capsys.readouterr().err
  assert path in message and "PVTv2 pvt_v2_b0 (--arch=pvt_v2_b0) with 20 classes" in message
  assert "missing (2):" in message and "unexpected (2):" in message
  assert "shape mismatch (2):" in message
  for name in (
    "backbone.block2.1.mlp.fc2.bias",
    "neck.fpn_convs.2.conv.weight",
    "neck.extra_convs.0.conv.weight",
    "backbone.block9.0.surprise.weight",
  ):
    assert f"  {name}" in message
  assert "backbone.norm2.weight: checkpoint (65,)" in message
  assert "head.scale_heads.2.2.conv.bias: checkpoint (64,)" in message
  assert "try --arch" not in message  # it is a (broken) pvt_v2_b0
  assert not out.exists()


def test_a_checkpoint_of_another_arch_is_named(pvt_b0, lvt20):
  lvt = to_public_state_dict(lvt20, "lvt")
  with pytest.raises(UserError, match="It looks like lvt: try --arch=lvt") as error:
    to_flax_variables(lvt, "pvt_v2_b0", log=_quiet)
  assert "backbone.block1.0.attn.q.weight" in str(error.value)  # missing, all of them listed
  pvt = to_public_state_dict(pvt_b0, "pvtv2")
  with pytest.raises(UserError, match="try --arch=pvt_v2_b0"):
    to_flax_variables(pvt, "lvt", log=_quiet)
  with pytest.raises(UserError, match="try --arch=pvt_v2_b0"):
    to_flax_variables(pvt, "pvt_v2_b2", log=_quiet)
  # The official ImageNet encoders: PVTv2 B0's Mix-FFNs are 8x wide in stage 1, MiT B0's 4x.
  flat = {k[len("backbone.") :]: v for k, v in pvt.items() if k.startswith("backbone.")}
  with pytest.raises(UserError, match="try --arch=pvt_v2_b0"):
    to_flax_variables(flat, "mit_b0", log=_quiet)
  segformer = _random_variables("segformer", "b0", 19)
  mit = to_public_state_dict(segformer)
  with pytest.raises(UserError, match="try --arch=mit_b0"):
    to_flax_variables(mit, "pvt_v2_b0", log=_quiet)
  assert guess_arch({"module.student." + k: v for k, v in pvt.items()}) == "pvt_v2_b0"
  assert guess_arch(lvt) == "lvt" and guess_arch(mit) == "mit_b0"
  with pytest.raises(UserError, match="pvt_v2_b0 .. pvt_v2_b5, lvt"):
    to_flax_variables({}, "swin_t")
  with pytest.raises(UserError, match="b9"):
    to_flax_variables({}, "pvt_v2_b9")
