"""Weight import: parity with HuggingFace transformers' SegFormer, .pth variants, errors."""

import json
import types

import buckets
import jax
import numpy as np
import pytest
from flax import traverse_util

from transkd_jax import build, checkpoint, convert, normalization
from transkd_jax.errors import UserError
from transkd_jax.models import MiTVariant, SegFormer, get_variant
from transkd_jax.weights import record as record_lib
from transkd_jax.weights.layouts import to_public_state_dict
from transkd_jax.weights.names import hf_to_public, public_to_hf, source_format
from transkd_jax.weights.readers import read_state_dict
from transkd_jax.weights.record import META_FILE
from transkd_jax.weights.to_flax import to_flax_variables

torch = pytest.importorskip(
  "torch", reason="torch is not installed: parity tests skipped (pip install -e \".[test]\")"
)
transformers = pytest.importorskip(
  "transformers",
  reason="transformers is not installed: parity tests skipped (pip install -e \".[test]\")",
)
ocp = pytest.importorskip("orbax.checkpoint")

# A B2-shaped MiT (B2 widths, heads and decoder width) with fewer blocks, to keep CI fast.
B2_SHALLOW = MiTVariant((64, 128, 320, 512), (1, 2, 1, 1), (1, 2, 5, 8), 768)


def _hf_model(spec, num_labels, seed=0):
  """A random HF SegFormer with every tensor perturbed (no trivial 0/1 weights)."""
  torch.manual_seed(seed)
  config = transformers.SegformerConfig(
    num_labels=num_labels,
    hidden_sizes=list(spec.channels),
    depths=list(spec.depths),
    num_attention_heads=list(spec.heads),
    decoder_hidden_size=spec.decoder_width,
  )
  model = transformers.SegformerForSemanticSegmentation(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      # Large enough in the encoder that, e.g., tanh-GELU instead of erf-GELU fails.
      p.add_((0.05 if name.startswith("decode_head") else 0.15) * torch.randn_like(p))
    for name, b in model.named_buffers():
      if name.endswith("running_mean"):
        b.copy_(0.1 * torch.randn_like(b))
      elif name.endswith("running_var"):
        b.copy_(0.5 + torch.rand_like(b))
  return model


def _hf_forward(model, images_nhwc):
  """HF logits, stage maps (NHWC) and patch embeddings (via forward hooks)."""
  embeddings = []
  hooks = [
    m.register_forward_hook(
      lambda _m, _i, out: embeddings.append(
        (out[0] if isinstance(out, tuple) else out).detach().numpy()
      )
    )
    for m in model.modules()
    if type(m).__name__ == "SegformerOverlapPatchEmbeddings"
  ]
  pixels = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    out = model(pixel_values=pixels, output_hidden_states=True)
  for h in hooks:
    h.remove()
  to_nhwc = lambda t: t.detach().numpy().transpose(0, 2, 3, 1)
  return {
    "logits": to_nhwc(out.logits),
    "features": [to_nhwc(h) for h in out.hidden_states],
    "embeddings": embeddings,
  }


def _ours(tree, spec, num_classes, images):
  model = SegFormer(spec, num_classes)
  return jax.jit(model.apply)(tree, images)


def _assert_parity(ours, theirs):
  # Within 1e-4 absolute in float32 (the bar), term by term.
  np.testing.assert_allclose(ours["logits"], theirs["logits"], atol=1e-4, rtol=0)
  assert len(theirs["features"]) == 4 and len(theirs["embeddings"]) == 4
  for a, b in zip(ours["features"], theirs["features"]):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
  for a, b in zip(ours["embeddings"], theirs["embeddings"]):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
  "spec,size",
  [
    ("b0", (64, 96)),
    ("b0", (72, 104)),  # odd stage sizes: 18x26, 9x13, 5x7, 3x4
    (B2_SHALLOW, (64, 64)),
  ],
)
def test_huggingface_parity(tmp_path, spec, size):
  spec_row = get_variant(spec)
  hf = _hf_model(spec_row, num_labels=19)
  hf.save_pretrained(tmp_path / "hf")
  state = read_state_dict(str(tmp_path / "hf"))
  tree, classes = to_flax_variables(state, spec, log=lambda *_: None)
  assert classes == 19
  images = np.random.RandomState(0).rand(2, *size, 3).astype(np.float32)
  _assert_parity(_ours(tree, spec_row, 19, images), _hf_forward(hf, images))


def test_cli_writes_restorable_orbax_checkpoint(tmp_path, capsys):
  hf = _hf_model(get_variant("b0"), num_labels=20)
  hf.save_pretrained(tmp_path / "hf")
  out = tmp_path / "ckpt"
  assert (
    convert.main(
      [
        f"--input={tmp_path / 'hf' / 'model.safetensors'}",
        "--arch=mit_b0",
        f"--output={out}",
        "--num-classes=19",
      ]
    )
    == 0
  )
  assert "dropped row 19" in capsys.readouterr().out
  tree = ocp.StandardCheckpointer().restore(str(out))
  assert set(tree) == {"params", "batch_stats"}
  meta = json.loads((out / META_FILE).read_text())
  assert meta["arch"] == "mit_b0" and meta["num_classes"] == 19
  assert meta["source_format"] == "huggingface" and meta["normalization"] == "imagenet"
  images = np.random.RandomState(1).rand(1, 64, 64, 3).astype(np.float32)
  ours = _ours(tree, "b0", 19, images)
  theirs = _hf_forward(hf, images)
  # The 19-way head is the 20-way head without its last (ignore) row.
  np.testing.assert_allclose(ours["logits"], theirs["logits"][..., :19], atol=1e-4, rtol=0)
  # An existing output is not overwritten unless asked.
  assert convert.main([f"--input={tmp_path / 'hf'}", "--arch=mit_b0", f"--output={out}"]) == 2
  assert "--overwrite" in capsys.readouterr().err


def _public_state_dict(tree):
  """The public PyTorch code's state dict for a Flax tree (the exporter's inverse mapping)."""
  return {k: torch.from_numpy(v) for k, v in to_public_state_dict(tree).items()}


@pytest.fixture(scope="module")
def b0_tree():
  hf = _hf_model(get_variant("b0"), num_labels=20, seed=3)
  state = {k: v.numpy() for k, v in hf.state_dict().items()}
  tree, _ = to_flax_variables(state, "mit_b0", log=lambda *_: None)
  return tree


def test_public_names_are_the_reference_ones(b0_tree):
  names = set(_public_state_dict(b0_tree))
  for name in [
    "patch_embed1.proj.weight",
    "block1.0.attn.q.weight",
    "block1.0.attn.kv.weight",
    "block1.0.attn.sr.weight",
    "block1.0.attn.norm.weight",
    "block1.0.mlp.dwconv.dwconv.weight",
    "norm1.weight",
    "linear_c4.proj.weight",
    "linear_fuse.conv.weight",
    "linear_fuse.bn.running_mean",
    "linear_pred.weight",
  ]:
    assert name in names
  assert "linear_fuse.bn.num_batches_tracked" in names  # as PyTorch's BatchNorm keeps it
  assert len(names) == len(jax.tree.leaves(b0_tree)) + 1


def test_public_and_huggingface_names_are_inverse(tmp_path, b0_tree):
  """public -> HF gives exactly save_pretrained's file names, and back gives the public ones."""
  public = to_public_state_dict(b0_tree)
  hf = public_to_hf(public)
  model = _hf_model(get_variant("b0"), num_labels=20)
  model.save_pretrained(tmp_path / "hf")
  from safetensors import safe_open

  with safe_open(str(tmp_path / "hf" / "model.safetensors"), "np") as f:
    assert set(hf) == set(f.keys())
    for name in hf:
      assert list(hf[name].shape) == list(f.get_slice(name).get_shape()), name
  back = hf_to_public(hf)
  assert set(back) == set(public)
  for name, value in public.items():
    np.testing.assert_array_equal(back[name], value)
  assert source_format(hf) == ("huggingface", "imagenet")
  assert source_format({f"module.student.{k}": v for k, v in public.items()}) == (
    "transkd",
    "unit",
  )
  assert source_format(public) == ("public", "unit")
  assert (
    source_format({k: v for k, v in public.items() if k.startswith(("patch", "block", "norm"))})[1]
    == "imagenet"
  )


def test_transkd_wrapper_checkpoint(tmp_path, b0_tree):
  """module. + student. prefixes, training-time modules beside, 20-way head -> 19."""
  state = {f"module.student.{k}": v for k, v in _public_state_dict(b0_tree).items()}
  state["module.student.linear_fuse.bn.num_batches_tracked"] = torch.tensor(7)
  state["module.skfs.0.conv1.0.weight"] = torch.zeros(64, 256, 1, 1)
  state["module.embed1_linearproject.weight"] = torch.zeros(64, 32)
  path = tmp_path / "transkd.pth"
  torch.save({"epoch": 3, "state_dict": state}, path)
  log = []
  tree, classes = to_flax_variables(read_state_dict(str(path)), "mit_b0", 19, log=log.append)
  assert classes == 19
  assert any("training-time modules" in line for line in log)
  np.testing.assert_array_equal(
    tree["params"]["head"]["linear_pred"]["kernel"],
    b0_tree["params"]["head"]["linear_pred"]["kernel"][..., :19],
  )
  np.testing.assert_array_equal(
    tree["params"]["encoder"]["block2_1"]["attn"]["kv"]["kernel"],
    b0_tree["params"]["encoder"]["block2_1"]["attn"]["kv"]["kernel"],
  )
  np.testing.assert_array_equal(
    tree["batch_stats"]["head"]["bn"]["var"], b0_tree["batch_stats"]["head"]["bn"]["var"]
  )


def test_bare_imagenet_encoder_gets_a_fresh_head(tmp_path, b0_tree):
  state = {
    k: v
    for k, v in _public_state_dict(b0_tree).items()
    if not k.startswith(("linear_", "linear_fuse"))
  }
  state["head.weight"] = torch.zeros(1000, 256)  # the ImageNet classifier
  state["head.bias"] = torch.zeros(1000)
  path = tmp_path / "mit_b0.pth"
  torch.save(state, path)
  out = tmp_path / "ckpt"
  assert convert.main([f"--input={path}", "--arch=mit_b0", f"--output={out}"]) == 0
  tree = ocp.StandardCheckpointer().restore(str(out))
  np.testing.assert_array_equal(
    tree["params"]["encoder"]["norm4"]["scale"], b0_tree["params"]["encoder"]["norm4"]["scale"]
  )
  assert tree["params"]["head"]["linear_pred"]["kernel"].shape == (1, 1, 256, 19)
  np.testing.assert_array_equal(tree["batch_stats"]["head"]["bn"]["var"], np.ones(256))


def test_mmseg_prefixes(b0_tree):
  state = {}
  for k, v in _public_state_dict(b0_tree).items():
    prefix = (
      "decode_head." if k.startswith(("linear_c", "linear_fuse", "linear_pred")) else "backbone."
    )
    state[prefix + k] = v.numpy()
  state["decode_head.conv_seg.weight"] = np.zeros((20, 256, 1, 1), np.float32)
  tree, classes = to_flax_variables(state, "mit_b0", log=lambda *_: None)
  assert classes == 20
  np.testing.assert_array_equal(
    tree["params"]["head"]["linear_c4"]["kernel"], b0_tree["params"]["head"]["linear_c4"]["kernel"]
  )


def test_every_problem_is_listed_at_once_and_nothing_is_written(tmp_path, b0_tree):
  state = _public_state_dict(b0_tree)
  del state["block3.1.mlp.fc2.bias"]
  state["block9.0.surprise.weight"] = torch.zeros(3)
  state["norm2.weight"] = torch.zeros(65)
  path = tmp_path / "broken.pth"
  torch.save(state, path)
  out = tmp_path / "never"
  with pytest.raises(UserError) as error:
    to_flax_variables(read_state_dict(str(path)), "mit_b0")
  message = str(error.value)
  assert "block3.1.mlp.fc2.bias" in message
  assert "block9.0.surprise.weight" in message
  assert "norm2.weight" in message and "(65,)" in message
  assert convert.main([f"--input={path}", "--arch=mit_b0", f"--output={out}"]) == 2
  assert not out.exists()


def test_wrong_arch_suggests_the_right_one(tmp_path, b0_tree):
  with pytest.raises(UserError, match="--arch=mit_b0") as error:
    to_flax_variables({k: v.numpy() for k, v in _public_state_dict(b0_tree).items()}, "mit_b2")
  assert "block1.2" in str(error.value)  # B2's extra blocks are missing


@pytest.mark.parametrize(
  "make,needle",
  [
    (lambda d: (d / "notes.pth").write_text("hello"), "not a readable PyTorch checkpoint"),
    (lambda d: (d / "x.safetensors").write_bytes(b"\x00" * 16), "not a readable safetensors"),
    (lambda d: (d / "weights.npz").write_bytes(b""), "unknown checkpoint type"),
    (lambda d: (d / "emptydir").mkdir(), "model.safetensors"),
  ],
)
def test_unreadable_inputs_are_named(tmp_path, capsys, make, needle):
  make(tmp_path)
  target = next(p for p in tmp_path.iterdir())
  assert convert.main([f"--input={target}", "--arch=mit_b0", f"--output={tmp_path / 'out'}"]) == 2
  err = capsys.readouterr().err
  assert needle in err and str(target) in err


def test_unknown_arch_and_missing_input(tmp_path, capsys):
  assert (
    convert.main(
      [f"--input={tmp_path / 'nope.pth'}", "--arch=mit_b0", f"--output={tmp_path / 'o'}"]
    )
    == 2
  )
  assert "no such file" in capsys.readouterr().err
  with pytest.raises(UserError, match="b9"):
    to_flax_variables({}, "mit_b9")


def test_other_class_counts_are_refused(b0_tree):
  state = {k: v.numpy() for k, v in _public_state_dict(b0_tree).items()}  # 20-way
  with pytest.raises(UserError, match="20 classes but --num-classes is 5"):
    to_flax_variables(state, "mit_b0", num_classes=5)


def test_a_converted_huggingface_teacher_gets_its_own_input_normalisation(tmp_path, capsys):
  """Our raw batch (the reference transforms' [0, 1] pixels), brought to the teacher's
  recorded normalisation as the train step does, gives the logits HuggingFace gives on
  its image processor's output."""
  from runs import set_variant, tiny_config

  hf = _hf_model(get_variant("b0"), num_labels=19, seed=5)
  hf.save_pretrained(tmp_path / "hf")
  assert (
    convert.main(
      [f"--input={tmp_path / 'hf'}", "--arch=mit_b0", f"--output={tmp_path / 'teacher'}"]
    )
    == 0
  )
  assert "expects imagenet input normalisation" in capsys.readouterr().out
  config = tiny_config(method="transkd_base", num_classes=19, image_size=(64, 96))
  set_variant(config, "teacher", "b0")
  config.teacher.checkpoint = str(tmp_path / "teacher")
  run = build.training(config)
  assert run.teacher.input_norm == "imagenet" and META_FILE in run.teacher.input_norm_source
  raw = np.random.RandomState(2).randint(0, 256, (2, 64, 96, 3)).astype(np.uint8)
  batch = raw.astype(np.float32) / 255.0  # what the reference transforms give the student
  teacher_input = normalization.renormalize(batch, "unit", run.teacher.input_norm)
  ours = np.asarray(
    jax.jit(run.teacher.model.apply)(run.teacher.variables, teacher_input)["logits"]
  )
  processor = transformers.SegformerImageProcessor(do_resize=False)
  pixels = processor(images=list(raw), return_tensors="np")["pixel_values"]
  theirs = _hf_forward(hf, pixels.transpose(0, 2, 3, 1))["logits"]
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
  # Overridden, and recorded at conversion: the same weights then expect [0, 1] pixels.
  config.teacher.input_norm = "unit"
  assert build.training(config).teacher.input_norm == "unit"
  assert (
    convert.main(
      [
        f"--input={tmp_path / 'hf'}",
        "--arch=mit_b0",
        "--input-norm=unit",
        f"--output={tmp_path / 'unit'}",
      ]
    )
    == 0
  )
  assert checkpoint.recorded_normalization(str(tmp_path / "unit"))[0] == "unit"


def test_renormalisation_is_the_per_channel_affine_map():
  raw = np.random.RandomState(0).randint(0, 256, (1, 4, 5, 3)).astype(np.float32)
  unit, imagenet = raw / 255.0, (raw - normalization.MEAN) / normalization.STD
  np.testing.assert_allclose(
    normalization.renormalize(unit, "unit", "imagenet"), imagenet, atol=1e-5
  )
  np.testing.assert_allclose(
    normalization.renormalize(imagenet, "imagenet", "unit"), unit, atol=1e-6
  )
  assert normalization.renormalize(unit, "unit", "unit") is unit
  with pytest.raises(ValueError, match="expected one of unit, imagenet"):
    normalization.renormalize(unit, "unit", "mmseg")


def test_output_in_a_bucket(tmp_path, b0_tree, capsys, monkeypatch):
  """--output=gs://...: the existence check and transkd_convert.json go through etils.epath
  (tests/buckets.py: its mock, no network) and Orbax is called with the URI. Orbax writes
  gs:// arrays through TensorStore, which epath's mock cannot redirect: the stand-in
  checkpointer passes Orbax the bucket's local directory instead."""
  monkeypatch.chdir(tmp_path)
  torch.save(_public_state_dict(b0_tree), tmp_path / "b0.pth")
  bucket = tmp_path / "bucket"
  saved = []

  class ToTheBucket:
    def __init__(self):
      self.real = ocp.StandardCheckpointer()

    def save(self, directory, tree, force=False):
      saved.append(str(directory))
      self.real.save(str(directory).replace("gs://bucket", str(bucket)), tree, force=force)

    def wait_until_finished(self):
      self.real.wait_until_finished()

  monkeypatch.setattr(record_lib, "ocp", types.SimpleNamespace(StandardCheckpointer=ToTheBucket))
  argv = [f"--input={tmp_path / 'b0.pth'}", "--arch=mit_b0", "--output=gs://bucket/runs/b0"]
  with buckets.mock_bucket(bucket):
    assert convert.main(argv) == 0
    assert "wrote gs://bucket/runs/b0 (mit_b0, 20 classes" in capsys.readouterr().out
    assert convert.main(argv) == 2  # the URI exists
    assert "--output gs://bucket/runs/b0 exists" in capsys.readouterr().err
    assert convert.main(argv + ["--overwrite"]) == 0
  assert saved == ["gs://bucket/runs/b0"] * 2
  out = bucket / "runs" / "b0"
  meta = json.loads((out / META_FILE).read_text())
  assert meta["arch"] == "mit_b0" and meta["source"] == str(tmp_path / "b0.pth")
  tree = ocp.StandardCheckpointer().restore(str(out))
  flat, expected = (traverse_util.flatten_dict(t) for t in (tree, b0_tree))
  assert flat.keys() == expected.keys()
  for key in flat:
    np.testing.assert_array_equal(flat[key], expected[key], err_msg=str(key))
  assert not (tmp_path / "gs:").exists()  # nothing went to a local "gs:" directory
