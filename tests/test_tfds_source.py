"""The TFDS source, over tiny array_record datasets written here without TensorFlow.

The builders are defined outside TFDS's registry, so ``tfds.data_source`` reads
them from their files under the data_dir, as it would a user's own dataset.
Image features are given PNG bytes (encoded with PIL: encoding numpy arrays
would need TensorFlow); Tensor features of unknown shape use zlib encoding.
"""

import io
import pickle

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from transkd_jax import data
from transkd_jax.config import base_config
from transkd_jax.data import default_data_config
from transkd_jax.data.classes import CITYSCAPES_ID_TO_TRAIN
from transkd_jax.data.datasets import make_source
from transkd_jax.data.tfds_source import tfds_source
from transkd_jax.errors import UserError

SPLITS = {"train": [(4, 6), (5, 7), (6, 8)], "validation": [(3, 5), (4, 4)]}
RAW_HW = (4, 5)


def _png(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


def _image(seed, hw):
  return np.random.default_rng(seed).integers(0, 256, hw + (3,), dtype=np.uint8)


def _train_ids(seed, hw):
  values = np.r_[np.arange(19), 255].astype(np.uint8)
  return values[(np.arange(hw[0] * hw[1]) + seed) % len(values)].reshape(hw)


def _expected():
  """name -> (image, train ids) of the images dataset."""
  return {
    f"{split}-{i}": (_image(seed, hw), _train_ids(seed, hw))
    for k, (split, sizes) in enumerate(SPLITS.items())
    for i, hw in enumerate(sizes)
    for seed in [100 * k + i]
  }


def _raw_features():
  ids = np.arange(RAW_HW[0] * RAW_HW[1], dtype=np.uint8).reshape(RAW_HW) * 2 % 34
  return {
    "grey": (ids * 7)[..., None],
    "ids": ids,
    "nyu": (ids * 5 % 41)[..., None],
    "wide": ids.astype(np.int32) - 1,
    "small": ids[:3],
    "image_png": _png(_image(9, RAW_HW)),
    "label_png": _png(_train_ids(9, RAW_HW)),
  }


with tfds.core.registered.skip_registration():

  class TkdImages(tfds.core.GeneratorBasedBuilder):
    """Image features as TFDS's segmentation datasets have them."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {
            "image": tfds.features.Image(shape=(None, None, 3)),
            "segmentation_mask": tfds.features.Image(shape=(None, None, 1)),
            "file_name": tfds.features.Text(),
          }
        ),
      )

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split):
      expected = _expected()
      for i in range(len(SPLITS[split])):
        image, label = expected[f"{split}-{i}"]
        yield (
          f"{split}-{i}",
          {"image": _png(image), "segmentation_mask": _png(label), "file_name": f"{split}-{i}"},
        )

  class TkdRaw(tfds.core.GeneratorBasedBuilder):
    """Raw tensors (grey image, label ids, wrong sizes) and encoded-bytes features."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      def tensor(shape, dtype=np.uint8):
        return tfds.features.Tensor(shape=shape, dtype=dtype, encoding="zlib")

      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {
            "grey": tensor((None, None, 1)),
            "ids": tensor((None, None)),
            "nyu": tensor((None, None, 1)),
            "wide": tensor((None, None), np.int32),
            "small": tensor((None, None)),
            "image_png": tfds.features.Tensor(shape=(), dtype=np.object_),
            "label_png": tfds.features.Tensor(shape=(), dtype=np.object_),
          }
        ),
      )

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      yield 0, _raw_features()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds")
  tfds.disable_progress_bar()
  for builder in (TkdImages, TkdRaw):
    builder(data_dir=str(root), file_format="array_record").download_and_prepare()
  return str(root)


def _source(root, split="train", **keys):
  return tfds_source(default_data_config(name="tfds", root=root, **keys), split)


def _images(root, split="train", **keys):
  return _source(root, split, **{"tfds_name": "tkd_images", "tfds_name_key": "file_name", **keys})


def test_lengths_and_exact_round_trip(data_dir):
  expected = _expected()
  for split, sizes in SPLITS.items():
    source = _images(data_dir, split)
    assert len(source) == len(sizes)
    names = []
    for i in range(len(source)):
      example = source[i]
      image, label = expected[example["name"]]
      assert example["image"].dtype == np.uint8 and example["label"].dtype == np.uint8
      np.testing.assert_array_equal(example["image"], image)
      np.testing.assert_array_equal(example["label"], label)
      assert example["skipped"] == 0 and example["skipped"].dtype == np.int32
      names.append(example["name"])
    assert sorted(names) == [f"{split}-{i}" for i in range(len(sizes))]
  # A versioned name; without a name key examples are named <split>_<index>.
  source = _source(data_dir, "validation", tfds_name="tkd_images:1.0.0")
  assert [source[i]["name"] for i in range(len(source))] == ["validation_0", "validation_1"]
  assert len(_images(data_dir, "train[:2]")) == 2


def test_grey_images_and_encoded_bytes(data_dir):
  raw = _raw_features()
  grey = _source(
    data_dir,
    tfds_name="tkd_raw",
    tfds_image_key="grey",
    tfds_label_key="ids",
    tfds_label_mapping="cityscapes_ids",
  )[0]
  assert grey["image"].shape == RAW_HW + (3,)
  np.testing.assert_array_equal(grey["image"], np.repeat(raw["grey"], 3, axis=-1))
  assert grey["name"] == "train_0"
  encoded = _source(
    data_dir, tfds_name="tkd_raw", tfds_image_key="image_png", tfds_label_key="label_png"
  )[0]
  np.testing.assert_array_equal(encoded["image"], _image(9, RAW_HW))
  np.testing.assert_array_equal(encoded["label"], _train_ids(9, RAW_HW))


def test_label_mappings(data_dir):
  raw = _raw_features()
  keys = {"tfds_name": "tkd_raw", "tfds_image_key": "grey"}
  cityscapes = _source(data_dir, tfds_label_key="ids", tfds_label_mapping="cityscapes_ids", **keys)[
    0
  ]["label"]
  np.testing.assert_array_equal(cityscapes, CITYSCAPES_ID_TO_TRAIN[raw["ids"]])
  assert set(cityscapes.ravel().tolist()) - {255}  # some ids map to classes
  ids = raw["nyu"][..., 0]
  for extra in ({}, {"tfds_num_classes": 40}):
    nyu = _source(data_dir, tfds_label_key="nyu", tfds_label_mapping="nyu40", **keys, **extra)[0][
      "label"
    ]
    np.testing.assert_array_equal(nyu[ids == 0], 255)
    np.testing.assert_array_equal(nyu[ids > 0], ids[ids > 0] - 1)
    assert (ids == 0).any() and (ids > 0).any()


def test_bad_label_values_name_the_values(data_dir):
  keys = {"tfds_name": "tkd_raw", "tfds_image_key": "grey"}
  with pytest.raises(
    UserError,
    match=r"tkd_raw\[train\] example 0.*values \[20, 22, 24, 26, "
    r"28\]; expected classes 0-18 or 255",
  ):
    _source(data_dir, tfds_label_key="ids", **keys)[0]
  with pytest.raises(UserError, match=r"values \[-1\]"):
    _source(data_dir, tfds_label_key="wide", **keys)[0]
  with pytest.raises(UserError, match=r"values \[20, 27, 28, 29, 30\]; expected 0 \(unlabelled\)"):
    _source(
      data_dir, tfds_label_key="nyu", tfds_label_mapping="nyu40", tfds_num_classes=19, **keys
    )[0]
  with pytest.raises(UserError, match=r"tfds_label_mapping='labelids'; expected one of"):
    _source(data_dir, tfds_label_mapping="labelids", **keys)


def test_size_mismatch_names_the_example(data_dir):
  with pytest.raises(
    UserError,
    match=r"image tkd_raw\[train\] example 0 \(train_0\) is 5x4 "
    r"but its label is 5x3",
  ):
    _source(data_dir, tfds_name="tkd_raw", tfds_image_key="grey", tfds_label_key="small")[0]


def test_wrong_feature_key_lists_the_keys(data_dir):
  with pytest.raises(
    UserError,
    match=r"tfds_image_key='image_left' is not a feature of TFDS "
    r"dataset 'tkd_images'; expected one of file_name, image, "
    r"segmentation_mask",
  ):
    _images(data_dir, tfds_image_key="image_left")
  with pytest.raises(UserError, match=r"tfds_label_key='segmentation_label'"):
    _images(data_dir, tfds_label_key="segmentation_label")
  with pytest.raises(UserError, match=r"tfds_name_key='image_id'"):
    _images(data_dir, tfds_name_key="image_id")


def test_missing_dataset_split_or_name(data_dir, tmp_path):
  with pytest.raises(
    UserError,
    match=r"no TFDS dataset config.data.tfds_name='no_such_set' "
    r"split 'train' under config.data.root='" + str(tmp_path),
  ):
    _source(str(tmp_path), tfds_name="no_such_set")
  with pytest.raises(
    UserError,
    match=r"tfds_name='tkd_images' split 'test' under "
    r".*Unknown split 'test'",
  ):
    _images(data_dir, "test")
  with pytest.raises(
    UserError,
    match=r"'cityscapes/semantic_segmentation' split 'train' "
    r".* is not prepared",
  ):
    _source(str(tmp_path), tfds_name="cityscapes/semantic_segmentation")
  with pytest.raises(UserError, match=r"config.data.tfds_name is empty"):
    _source(data_dir)


def test_pickles_and_feeds_grain(data_dir):
  source = _images(data_dir)
  first = source[0]
  copy = pickle.loads(pickle.dumps(source))
  assert copy._source is None  # opened lazily, in the process that reads
  assert len(copy) == 3
  again = copy[0]
  assert again["name"] == first["name"]
  np.testing.assert_array_equal(again["image"], first["image"])
  np.testing.assert_array_equal(again["label"], first["label"])
  from_grain = grain.MapDataset.source(source)[0]
  np.testing.assert_array_equal(from_grain["label"], first["label"])


def test_make_source_and_the_eval_iterator_read_tfds(data_dir):
  cfg = data.default_data_config(
    name="tfds", root=data_dir, tfds_name="tkd_images", tfds_name_key="file_name"
  )
  assert len(make_source(cfg, "train")) == 3
  config = base_config()
  config.update(batch_size=2, seed=0, image_size=(32, 32))
  config.data = cfg
  # The split's labels differ in size: the default pads to the first one's, too small here.
  with pytest.raises(
    UserError,
    match=r"validation-1 is 4x4 .* larger than the 3x5 .*"
    "eval_label_pad",
  ):
    list(data.make_eval_iterator(config, "validation"))
  config.data.eval_label_pad = (4, 5)  # padded with 255, true sizes kept
  (batch,) = list(data.make_eval_iterator(config, "validation"))
  assert batch["valid"].all() and batch["image"].shape == (2, 32, 32, 3)
  sizes = {tuple(s) for s in batch["label_size"]}
  assert (
    sizes
    == {
      tuple(_source(data_dir, "validation", tfds_name="tkd_images")[i]["label"].shape)
      for i in range(2)
    }
    and len(sizes) == 2
  )
  for label, (h, w) in zip(batch["label"], batch["label_size"]):
    assert (label[h:] == 255).all() and (label[:, w:] == 255).all()
