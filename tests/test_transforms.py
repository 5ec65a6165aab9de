"""The transforms: the public code's (reference, checked against the PIL calls it makes),
the aligned variant, mmseg's, and choosing them."""

import numpy as np
import pytest
from PIL import Image, ImageOps

from transkd_jax import data, normalization
from transkd_jax.config import base_config
from transkd_jax.data import generated, transforms
from transkd_jax.errors import UserError


def _config(root, **data_overrides):
  config = base_config()
  config.update(batch_size=2, seed=3, image_size=(32, 64))
  config.data.update(
    transforms="mmseg",
    mmseg_scale=(64, 128),
    root=str(root),
    num_train=4,
    num_val=3,
    generated_size=(64, 128),
  )
  config.data.update(data_overrides)
  return config


def _example(shape=(64, 128), seed=0):
  rng = np.random.default_rng(seed)
  return {
    "image": rng.integers(0, 256, shape + (3,), dtype=np.uint8),
    "label": rng.integers(0, 19, shape, dtype=np.uint8),
  }


@pytest.mark.parametrize(
  "full,out",
  [
    ((1024, 2048), (128, 256)),  # Cityscapes
    ((1080, 1920), (128, 228)),  # ACDC at 512 x 910
    ((1024, 2048), (127, 255)),
    ((37, 53), (11, 17)),
    ((4000, 3000), (17, 1001)),
    ((13, 7), (29, 31)),
  ],
)
def test_labels_resize_as_pil_nearest(full, out):
  label = np.random.default_rng(0).integers(0, 256, full).astype(np.uint8)
  expected = np.asarray(Image.fromarray(label).resize(out[::-1], Image.NEAREST))
  np.testing.assert_array_equal(transforms.resize_label_pil(label, out), expected)


def test_quarter_size_rounds_like_the_public_code():
  assert transforms.quarter_size((512, 1024)) == (128, 256)
  assert transforms.quarter_size((512, 910)) == (128, 228)  # int(227.5 + 0.5)
  assert transforms.quarter_size((510, 1017)) == (128, 254)


def _public_shift(array, tx, ty, fill):
  """The public code's two PIL calls."""
  image = Image.fromarray(array)
  image = ImageOps.expand(image, border=(tx, ty, 0, 0), fill=fill)
  return np.asarray(image.crop((0, 0, image.size[0] - tx, image.size[1] - ty)))


@pytest.mark.parametrize("ty", range(-2, 3))
@pytest.mark.parametrize("tx", range(-2, 3))
def test_the_reference_shift_is_pil_expand_then_crop(tx, ty):
  example = _example((9, 13))
  np.testing.assert_array_equal(
    transforms.public_shift(example["image"], ty, tx, 0), _public_shift(example["image"], tx, ty, 0)
  )
  np.testing.assert_array_equal(
    transforms.public_shift(example["label"], ty, tx, 255),
    _public_shift(example["label"], tx, ty, 255),
  )


def _public_train(example, size, flip, tx, ty):
  """The public MyCoTransform on PIL images, its random draws given."""
  h, w = size
  image = Image.fromarray(example["image"]).resize((w, h), Image.BILINEAR)
  target = Image.fromarray(example["label"]).resize(
    (int(w / 4 + 0.5), int(h / 4 + 0.5)), Image.NEAREST
  )
  if flip:
    image = image.transpose(Image.FLIP_LEFT_RIGHT)
    target = target.transpose(Image.FLIP_LEFT_RIGHT)
  image = np.asarray(image)
  return (_public_shift(image, tx, ty, 0), _public_shift(np.asarray(target), tx, ty, 255))


@pytest.mark.parametrize("seed", range(6))
def test_reference_training_is_the_public_transform_exactly(seed):
  """Same draws (flip, then the shift), same image and label, misregistration included."""
  example = _example((100, 180), seed)
  out = transforms.reference_train(example, np.random.default_rng(seed), (48, 90))
  draws = np.random.default_rng(seed)
  flip = draws.uniform() < 0.5
  ty, tx = (int(v) for v in draws.integers(-2, 3, size=2))
  image, label = _public_train(example, (48, 90), flip, tx, ty)
  np.testing.assert_array_equal(out["image"], image)
  np.testing.assert_array_equal(out["label"], label)
  assert out["label"].shape == (12, 23)


def test_aligned_training_keeps_image_and_label_registered():
  """A label equal to a channel of the image stays equal to it after the aligned shift."""
  rng = np.random.default_rng(0)
  label = rng.integers(0, 19, (64, 128)).repeat(1, 0).astype(np.uint8)
  example = {"image": np.repeat(label[..., None], 3, axis=2), "label": label}
  for seed in range(4):
    out = transforms.aligned_train(example, np.random.default_rng(seed), (64, 128))
    pixels = out["image"][..., 0].astype(np.int32)
    quarter = pixels[transforms.pil_nearest_indices(64, 16)][
      :, transforms.pil_nearest_indices(128, 32)
    ]
    ok = out["label"] != 255
    np.testing.assert_array_equal(out["label"][ok], quarter[ok])
    assert set(np.unique(out["label"])) <= set(range(19)) | {255}


@pytest.fixture(scope="module")
def gen_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("gen") / "tree"
  generated.write_dataset(str(root), 4, 3, (64, 128), seed=0)
  return root


def test_train_and_eval_shapes_and_dtypes():
  out = transforms.mmseg_train(_example(), np.random.default_rng(0), (32, 48), scale=(64, 128))
  assert out["image"].shape == (32, 48, 3) and out["image"].dtype == np.uint8  # normalised
  assert out["label"].shape == (32, 48) and out["label"].dtype == np.int32  # on the device
  ev = transforms.mmseg_eval(_example(), scale=(32, 64))  # fits 32 x 64, aspect kept
  assert ev["image"].shape == (32, 64, 3) and ev["image"].dtype == np.uint8
  assert ev["label"].shape == (64, 128) and ev["label"].dtype == np.int32  # full resolution
  assert transforms.rescale_size((1024, 2048), (1024, 2048), 0.75) == (768, 1536)
  assert transforms.rescale_size((100, 100), (1024, 2048)) == (1024, 1024)


def test_normalisation_uses_the_imagenet_constants():
  mean = np.array([123.675, 116.28, 103.53])
  std = np.array([58.395, 57.12, 57.375])
  image = np.array([[[0, 0, 0], [255, 255, 255], [124, 116, 104]]], np.uint8)
  expected = (image.astype(np.float64) - mean) / std
  np.testing.assert_allclose(
    normalization.renormalize(image, "imagenet", "imagenet"), expected, rtol=1e-6, atol=1e-6
  )
  np.testing.assert_allclose(
    normalization.renormalize(image, "imagenet", "unit"), image / 255.0, rtol=1e-6, atol=1e-7
  )
  # Without resizing, eval is exactly the pixels; mmseg's padding normalises to ~0.
  example = _example((32, 64))
  np.testing.assert_array_equal(
    transforms.mmseg_eval(example, scale=(32, 64))["image"], example["image"]
  )
  pad = normalization.renormalize(transforms.MEAN_PIXEL, "imagenet", "imagenet")
  assert np.abs(pad).max() < 0.01  # at most half a grey level off the mean


def test_cat_max_ratio_redraws_a_crop_dominated_by_one_class():
  label = np.zeros((8, 64), np.uint8)
  label[:, 56:] = np.arange(8) % 2 + 1  # classes 1 and 2 only at the right
  label[:, :8] = 255  # ignored pixels do not count
  # An 8 x 8 crop at left l has class 0 on (56 - l) / 8 of its labelled pixels
  # (l >= 8): below 0.75 only for l >= 51.
  balanced = {l for l in range(57) if transforms.crop_is_balanced(label[:, l : l + 8], 0.75)}
  assert balanced == set(range(51, 57))
  assert not transforms.crop_is_balanced(label[:, :16], 0.75)  # class 0 and ignore only
  picks = set()
  for seed in range(20):
    _, left, window = transforms.random_crop_box(
      lambda t, l, w: label[t : t + w[0], l : l + w[1]],
      label.shape,
      (8, 8),
      np.random.default_rng(seed),
      cat_max_ratio=0.75,
      tries=1000,
    )
    picks.add(left)
    assert window == (8, 8)
  assert picks <= balanced
  # With the test off, dominated crops are kept.
  lefts = {
    transforms.random_crop_box(
      None, label.shape, (8, 8), np.random.default_rng(s), cat_max_ratio=1.0
    )[1]
    for s in range(20)
  }
  assert lefts - balanced


def test_flip_keeps_image_and_label_aligned():
  image = np.zeros((32, 64, 3), np.uint8)
  label = np.zeros((32, 64), np.uint8)
  image[5, 3] = 255
  label[5, 3] = 7
  flipped = 0
  for seed in range(12):
    out = transforms.mmseg_train(
      {"image": image, "label": label},
      np.random.default_rng(seed),
      (32, 64),
      scale=(32, 64),
      ratio_range=(1.0, 1.0),
      cat_max_ratio=1.0,
    )
    ys, xs = np.nonzero(out["label"] == 7)
    bright = np.argmax(out["image"].sum(-1))
    assert (ys.tolist(), xs.tolist()) == ([5], [int(bright % 64)]) and bright // 64 == 5
    flipped += int(xs[0] == 60)
  assert 0 < flipped < 12


def test_pads_image_with_the_mean_and_label_with_255_when_the_crop_is_larger():
  out = transforms.mmseg_train(
    _example((16, 32)), np.random.default_rng(0), (24, 40), scale=(16, 32), ratio_range=(1.0, 1.0)
  )
  assert out["image"].shape == (24, 40, 3) and out["label"].shape == (24, 40)
  assert (out["label"][16:] == 255).all() and (out["label"][:, 32:] == 255).all()
  mean = transforms.MEAN_PIXEL  # normalises to ~0, as mmseg's pad after Normalize
  assert (out["image"][16:] == mean).all() and (out["image"][:, 32:] == mean).all()
  assert (out["label"][:16, :32] < 19).all()


def test_hsv_round_trips_and_hue_shift():
  rng = np.random.default_rng(0)
  rgb = rng.uniform(0, 1, (64, 3)).astype(np.float32)
  hsv = transforms.rgb_to_hsv(rgb)
  assert hsv[:, 0].min() >= 0 and hsv[:, 0].max() < 360 and hsv[:, 1].max() <= 1
  np.testing.assert_allclose(transforms.hsv_to_rgb(hsv), rgb, atol=1e-3)
  for delta in (0.0, 360.0):  # a zero (or full-turn) hue shift is the identity
    shifted = hsv.copy()
    shifted[:, 0] = np.mod(shifted[:, 0] + delta, 360)
    np.testing.assert_allclose(transforms.hsv_to_rgb(shifted), rgb, atol=1e-3)
  red = transforms.rgb_to_hsv(np.array([[1.0, 0.0, 0.0]], np.float32))
  red[:, 0] += 120
  np.testing.assert_allclose(transforms.hsv_to_rgb(red), [[0, 1, 0]], atol=1e-6)
  # OpenCV's uint8 convention: H in 2-degree units, S and V in 0..255.
  colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 128, 0], [9, 9, 9]], np.uint8)
  np.testing.assert_array_equal(
    transforms.hsv_u8(colours),
    [[0, 255, 255], [60, 255, 255], [120, 255, 255], [15, 255, 255], [0, 0, 9]],
  )
  np.testing.assert_array_equal(transforms.rgb_u8(transforms.hsv_u8(colours)), colours)
  image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)  # quantised H: a few levels off
  assert np.abs(transforms.rgb_u8(transforms.hsv_u8(image)).astype(int) - image).max() <= 5


def test_same_seed_same_output():
  example = _example()
  a, b, c = (
    transforms.mmseg_train(example, np.random.default_rng(s), (32, 48), scale=(64, 128))
    for s in (5, 5, 6)
  )
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["label"], b["label"])
  assert not np.array_equal(a["image"], c["image"])


def test_transforms_selection_and_errors(gen_root):
  config = _config(gen_root, transforms="segformer")
  for make in (transforms.train_transform, transforms.eval_transform):
    with pytest.raises(
      UserError,
      match="config.data.transforms='segformer' is not known; "
      "expected one of reference, aligned, mmseg",
    ):
      make(config)
  with pytest.raises(UserError, match="config.data.transforms"):
    data.make_train_iterator(config)
  with pytest.raises(UserError, match="config.data.mmseg_ratio_range"):
    transforms.train_transform(_config(gen_root, mmseg_ratio_range=(2.0, 0.5)))
  for name, fn in (
    ("reference", transforms.reference_train),
    ("aligned", transforms.aligned_train),
  ):
    chosen = transforms.train_transform(_config(gen_root, transforms=name))
    out = chosen(_example(), np.random.default_rng(0))
    np.testing.assert_array_equal(
      out["label"], fn(_example(), np.random.default_rng(0), (32, 64))["label"]
    )
    assert out["label"].shape == (8, 16) and out["image"].dtype == np.uint8


def test_mmseg_pipeline_yields_uint8_crops(gen_root):
  config = _config(gen_root)
  batch = next(data.make_train_iterator(config))
  assert batch["image"].shape == (2, 32, 64, 3) and batch["image"].dtype == np.uint8
  assert batch["label"].shape == (2, 32, 64) and batch["label"].dtype == np.int32
  assert set(np.unique(batch["label"])) <= set(range(19)) | {255}
  ev = next(data.make_eval_iterator(config, "val"))
  assert ev["image"].shape == (2, 64, 128, 3) and ev["label"].shape == (2, 64, 128)
  assert ev["valid"].tolist() == [True, True]
