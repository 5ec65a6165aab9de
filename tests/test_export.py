"""Export: HuggingFace parity, exact round trips through convert, variant inference, errors."""

import json

import buckets
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from transkd_jax import export, normalization
from transkd_jax.models import MiTVariant, SegFormer, archs
from transkd_jax.weights.hf_config import class_names, input_settings, preprocessor_config
from transkd_jax.weights.readers import read_state_dict
from transkd_jax.weights.record import record, save
from transkd_jax.weights.to_flax import to_flax_variables

torch = pytest.importorskip("torch", reason="torch is not installed (pip install -e \".[test]\")")
transformers = pytest.importorskip(
  "transformers", reason="transformers is not installed (pip install -e \".[test]\")"
)

# No row of the variant table: the heads (not the table's 1, 2, 5, 8) must be given.
TINY = MiTVariant((8, 16, 24, 32), (1, 2, 1, 1), (1, 2, 3, 4), 16)
TINY_HEADS = "--heads=1,2,3,4"
CLASSES = 5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(variables, directory): a perturbed random TINY with non-trivial batch_stats, saved as
  convert saves it, its transkd_convert.json recording an ImageNet-normalised source."""
  variables = jax.jit(SegFormer(TINY, CLASSES).init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  rng = np.random.RandomState(0)
  flat = {}
  for path, value in traverse_util.flatten_dict(jax.device_get(variables)).items():
    value = np.asarray(value, np.float32)
    if path[-1] == "mean":
      value = 0.1 * rng.randn(*value.shape)
    elif path[-1] == "var":
      value = 0.5 + rng.rand(*value.shape)
    else:  # no trivial zero biases or unit scales
      value = value + 0.1 * rng.randn(*value.shape)
    flat[path] = value.astype(np.float32)
  variables = traverse_util.unflatten_dict(flat)
  path = tmp_path_factory.mktemp("tiny") / "converted"
  save(
    variables, str(path), {"arch": "custom", "num_classes": CLASSES, "normalization": "imagenet"}
  )
  return variables, path


def _assert_same_tree(a, b):
  a, b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  assert set(a) == set(b)
  for key in a:
    np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=str(key))


def test_hf_export_matches_transformers(tmp_path, tiny, capsys):
  variables, ckpt = tiny
  out = tmp_path / "hf"
  assert export.main([f"--checkpoint={ckpt}", "--format=hf", f"--output={out}", TINY_HEADS]) == 0
  line = capsys.readouterr().out
  assert line.count("\n") == 1 and "wrote" in line and "imagenet" in line

  model, info = transformers.SegformerForSemanticSegmentation.from_pretrained(
    str(out), output_loading_info=True
  )
  assert not any(info.values()), info  # nothing missing, unexpected or mis-shaped
  model.eval()
  images = np.random.RandomState(1).rand(2, 64, 96, 3).astype(np.float32)
  ours = np.asarray(jax.jit(SegFormer(TINY, CLASSES).apply)(variables, images)["logits"])
  with torch.no_grad():
    theirs = model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).logits
  theirs = theirs.numpy().transpose(0, 2, 3, 1)
  assert ours.shape == theirs.shape == (2, 16, 24, CLASSES)
  assert np.abs(ours - theirs).max() < 1e-4

  config = model.config
  assert config.num_attention_heads == [1, 2, 3, 4] and config.hidden_sizes == [8, 16, 24, 32]
  assert config.id2label[0] == "class_0" and config.semantic_loss_ignore_index == 255
  # auto: transkd_convert.json records an ImageNet-normalised source.
  processor = transformers.SegformerImageProcessor.from_pretrained(str(out))
  image = np.random.RandomState(2).randint(0, 256, (40, 60, 3)).astype(np.uint8)
  pixels = processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  np.testing.assert_allclose(pixels, (image - normalization.MEAN) / normalization.STD, atol=1e-5)
  # The exported weights come back through convert exactly.
  tree, classes = to_flax_variables(read_state_dict(str(out)), TINY, log=lambda *_: None)
  assert classes == CLASSES
  _assert_same_tree(tree, variables)


def test_pytorch_export_round_trips_through_convert(tmp_path, tiny):
  variables, ckpt = tiny
  out = tmp_path / "pt"
  assert (
    export.main([f"--checkpoint={ckpt}", "--format=pytorch", f"--output={out}", TINY_HEADS]) == 0
  )
  state = torch.load(out / "model.pth", weights_only=True)
  for name in (
    "patch_embed1.proj.weight",
    "block1.0.attn.q.weight",
    "block1.0.attn.kv.weight",
    "block1.0.attn.sr.weight",
    "block2.1.mlp.dwconv.dwconv.weight",
    "norm4.weight",
    "linear_c4.proj.weight",
    "linear_fuse.conv.weight",
    "linear_fuse.bn.running_mean",
    "linear_fuse.bn.num_batches_tracked",
    "linear_pred.weight",
  ):
    assert name in state, name
  assert tuple(state["block1.0.attn.kv.weight"].shape) == (16, 8)  # out x in
  assert tuple(state["block1.0.attn.sr.weight"].shape) == (8, 8, 8, 8)
  assert tuple(state["linear_pred.weight"].shape) == (CLASSES, 16, 1, 1)
  tree, _ = to_flax_variables(read_state_dict(str(out / "model.pth")), TINY, log=lambda *_: None)
  _assert_same_tree(tree, variables)


def test_normalisation_from_a_run_config(tmp_path):
  for step, data, size in (
    (3, {"transforms": "mmseg"}, [512, 512]),
    (9, {"protocol": "reference", "name": "cityscapes"}, [64, 128]),
  ):
    (tmp_path / "checkpoints" / str(step) / "config").mkdir(parents=True)
    (tmp_path / "checkpoints" / str(step) / "config" / "metadata").write_text(
      json.dumps({"data": data, "image_size": size})
    )
  # The step the weights came from decides; else the newest.
  norm, _, size, data = input_settings(
    str(tmp_path), "auto", f"{tmp_path}/checkpoints/3 (step 3, latest)"
  )
  assert (norm, size) == ("imagenet", None)  # mmseg: the processor does not resize
  norm, _, size, data = input_settings(str(tmp_path), "auto", "")
  assert (norm, size) == ("unit", (64, 128))
  assert class_names(19, data)[0] == "road"
  assert input_settings(str(tmp_path), "imagenet", "")[0] == "imagenet"
  config = preprocessor_config("unit", (64, 128))
  assert config["image_mean"] == [0, 0, 0] and config["image_std"] == [1, 1, 1]
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
  processor = transformers.SegformerImageProcessor.from_pretrained(str(tmp_path))
  image = np.full((32, 48, 3), 51, np.uint8)
  pixels = processor(images=image, return_tensors="np")["pixel_values"]
  assert pixels.shape == (1, 3, 64, 128) and np.allclose(pixels, 0.2)  # [0, 1], resized


def test_errors_name_the_flag(tmp_path, tiny, capsys):
  _, ckpt = tiny
  missing = tmp_path / "nowhere"
  assert export.main([f"--checkpoint={missing}", "--format=hf", f"--output={tmp_path / 'o'}"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: --checkpoint") and str(missing) in err
  assert not (tmp_path / "o").exists()

  existing = tmp_path / "existing"
  existing.mkdir()
  assert (
    export.main([f"--checkpoint={ckpt}", "--format=pytorch", f"--output={existing}", TINY_HEADS])
    == 2
  )
  assert "--overwrite" in capsys.readouterr().err
  assert export.main([f"--checkpoint={ckpt}", "--format=tflite", f"--output={tmp_path / 'x'}"]) == 2
  assert "--format='tflite'" in capsys.readouterr().err
  assert (
    export.main(
      [
        f"--checkpoint={ckpt}",
        "--format=hf",
        f"--output={tmp_path / 'x'}",
        "--normalization=zscore",
      ]
    )
    == 2
  )
  assert "--normalization" in capsys.readouterr().err
  assert export.main([f"--checkpoint={ckpt}", "--format=hf", f"--output={tmp_path / 'x'}"]) == 2
  assert "--heads" in capsys.readouterr().err and not (tmp_path / "x").exists()
  assert (
    export.main(
      [
        f"--checkpoint={ckpt}",
        "--format=pytorch",
        f"--output={existing}",
        TINY_HEADS,
        "--overwrite",
      ]
    )
    == 0
  )
  assert (existing / "model.pth").exists()


# --------------------------------------------------------------------------
# PVTv2 and LVT: the public layout
# --------------------------------------------------------------------------


def _random_variables(family, variant, num_classes, seed):
  """Full-size variables with random values, from abstract init only (no compile)."""
  model = archs.build(family, variant, num_classes)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  rng = np.random.default_rng(seed)
  flat = {}
  for path, leaf in traverse_util.flatten_dict(shapes).items():
    value = rng.normal(scale=0.1, size=leaf.shape).astype(np.float32)
    flat[path] = 1 + np.abs(value) if path[-1] in ("scale", "var") else value
  return traverse_util.unflatten_dict(flat)


@pytest.mark.parametrize(
  "family,variant,arch,recorded",
  [
    ("pvtv2", "b0", "pvt_v2_b0", False),  # family from the tree, variant from the shapes
    ("lvt", "lvt", "lvt", True),  # both from transkd_convert.json
  ],
)
def test_public_export_round_trips_pvtv2_and_lvt(tmp_path, capsys, family, variant, arch, recorded):
  variables = _random_variables(family, variant, 19, seed=4)
  ckpt = tmp_path / "converted"
  meta = {"num_classes": 19, "normalization": "unit"}
  if recorded:
    meta.update(record(arch, 19, "", "public", "unit"))
  save(variables, str(ckpt), meta)
  out = tmp_path / "pt"
  assert export.main([f"--checkpoint={ckpt}", "--format=public", f"--output={out}"]) == 0
  line = capsys.readouterr().out
  label = {"pvtv2": "PVTv2", "lvt": "LVT"}[family]
  assert f"public {label} layout; {arch}, 19 classes" in line
  state = torch.load(out / "model.pth", weights_only=True)
  if family == "pvtv2":
    assert tuple(state["neck.lateral_convs.0.conv.weight"].shape) == (256, 32, 1, 1)
    assert tuple(state["head.scale_heads.3.4.conv.weight"].shape) == (128, 128, 3, 3)
    assert tuple(state["head.conv_seg.weight"].shape) == (19, 128, 1, 1)
    assert len(state) == 208
  else:
    assert tuple(state["backbone.0.1.0.attn.weight.weight"].shape) == (576, 64, 1, 1)
    assert tuple(state["backbone.2.1.1.mlp.fc1.weight"].shape) == (640, 160, 1, 1)
    assert int(state["linear_fuse.bn.num_batches_tracked"]) == 0
    assert len(state) == 164
  tree, classes = to_flax_variables(
    read_state_dict(str(out / "model.pth")), arch, log=lambda *_: None
  )
  assert classes == 19
  _assert_same_tree(tree, variables)


def test_pvtv2_and_lvt_have_no_huggingface_export(tmp_path, capsys):
  variables = _random_variables("pvtv2", "b0", 19, seed=5)
  ckpt = tmp_path / "converted"
  save(variables, str(ckpt), {"num_classes": 19})
  out = tmp_path / "hf"
  assert export.main([f"--checkpoint={ckpt}", "--format=hf", f"--output={out}"]) == 2
  err = capsys.readouterr().err
  assert "SegFormer only" in err and "PVTv2 (pvt_v2_b0)" in err and "--format=pytorch" in err
  assert not out.exists()
  assert (
    export.main([f"--checkpoint={ckpt}", "--format=pytorch", f"--output={out}", "--heads=1,2,5,8"])
    == 2
  )
  assert "--heads" in capsys.readouterr().err


def test_output_in_a_bucket(tmp_path, tiny, capsys, monkeypatch):
  """--output=gs://...: existence checks, the directory and every file go through
  etils.epath (tests/buckets.py: its mock, no network)."""
  variables, ckpt = tiny
  monkeypatch.chdir(tmp_path)
  bucket = tmp_path / "bucket"
  with buckets.mock_bucket(bucket):
    for fmt in ("hf", "pytorch", "onnx"):
      argv = [f"--checkpoint={ckpt}", f"--format={fmt}", f"--output=gs://bucket/{fmt}", TINY_HEADS]
      assert export.main(argv) == 0
      assert "wrote gs://bucket/" in capsys.readouterr().out
      assert export.main(argv) == 2  # the URI exists
      assert "--output gs://bucket/" in capsys.readouterr().err
      assert export.main(argv + ["--overwrite"]) == 0
    (bucket / "file").write_text("")
    argv = [f"--checkpoint={ckpt}", "--format=hf", "--output=gs://bucket/file", TINY_HEADS]
    assert export.main(argv) == 2
    assert "--output gs://bucket/file is a file" in capsys.readouterr().err
  assert sorted(p.name for p in (bucket / "hf").iterdir()) == [
    "config.json",
    "model.safetensors",
    "preprocessor_config.json",
  ]
  assert json.loads((bucket / "hf" / "config.json").read_text())["num_labels"] == CLASSES
  assert sorted(p.name for p in (bucket / "pytorch").iterdir()) == ["model.pth"]
  assert sorted(p.name for p in (bucket / "onnx").iterdir()) == ["model.onnx"]
  for path in (bucket / "hf" / "model.safetensors", bucket / "pytorch" / "model.pth"):
    tree, _ = to_flax_variables(read_state_dict(str(path)), TINY, log=lambda *_: None)
    _assert_same_tree(tree, variables)
  assert not (tmp_path / "gs:").exists()  # nothing went to a local "gs:" directory


def test_onnx_export_runs_as_the_model(tmp_path, tiny, capsys):
  """--format=onnx --argmax of a converted directory: the record's ImageNet normalisation
  is inside the graph, and onnxruntime gives our logits on raw uint8 pixels."""
  onnx = pytest.importorskip("onnx")
  ort = pytest.importorskip("onnxruntime")
  variables, ckpt = tiny
  out = tmp_path / "onnx"
  argv = [f"--checkpoint={ckpt}", "--format=onnx", f"--output={out}", TINY_HEADS, "--argmax"]
  assert export.main(argv) == 0
  line = capsys.readouterr().out
  assert "uint8 pixels, imagenet normalisation from" in line and "logits and labels" in line
  graph = onnx.load(out / "model.onnx")
  meta = {p.key: p.value for p in graph.metadata_props}
  assert meta["family"] == "segformer" and meta["normalization"] == "imagenet"
  assert len(json.loads(meta["class_names"])) == CLASSES
  session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
  pixels = np.random.default_rng(1).integers(0, 256, (2, 64, 32, 3), dtype=np.uint8)
  logits, labels = session.run(None, {"pixels": pixels.transpose(0, 3, 1, 2)})
  images = normalization.renormalize(pixels, "imagenet", "imagenet")
  want = jax.jit(SegFormer(TINY, CLASSES).apply)(variables, images)["logits"]
  np.testing.assert_allclose(logits, np.asarray(want).transpose(0, 3, 1, 2), atol=1e-4)
  assert labels.shape == (2, 64, 32)
  assert export.main([*argv[:3], TINY_HEADS, "--format=hf", "--argmax", "--overwrite"]) == 2
  assert "--argmax: only --format=onnx" in capsys.readouterr().err
