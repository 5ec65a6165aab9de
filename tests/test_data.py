"""Data: the generator, the Cityscapes source, transforms, and the grain iterators."""

import os
import shutil
import time
import types

import buckets
import numpy as np
import pytest
from PIL import Image

from transkd_jax import data
from transkd_jax.config import base_config, validate_config
from transkd_jax.data import generated, pipeline
from transkd_jax.data.classes import CITYSCAPES_ID_TO_TRAIN, CITYSCAPES_NAMES
from transkd_jax.data.datasets import make_source
from transkd_jax.errors import UserError


def CityscapesSource(root, split):
  return make_source(data.default_data_config(name="cityscapes", root=root), split)


def _config(root, **data_overrides):
  config = base_config()
  config.update(batch_size=2, seed=3, image_size=(64, 128))
  config.data.update(root=str(root), num_train=10, num_val=5, generated_size=(64, 128))
  config.data.update(data_overrides)
  return config


@pytest.fixture(scope="module")
def gen_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("gen") / "tree"
  generated.write_dataset(str(root), 10, 5, (64, 128), seed=0)
  return root


def test_generator_is_deterministic_and_covers_the_classes():
  a_img, a_lab = generated.generate_scene(0, 7, (128, 256))
  b_img, b_lab = generated.generate_scene(0, 7, (128, 256))
  c_img, _ = generated.generate_scene(1, 7, (128, 256))
  assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
  assert not np.array_equal(a_img, c_img)
  seen = set()
  for i in range(40):
    seen |= set(np.unique(CITYSCAPES_ID_TO_TRAIN[generated.generate_scene(0, i, (128, 256))[1]]))
  assert set(range(19)) <= seen, sorted(set(range(19)) - seen)
  assert 255 in seen  # the ego-vehicle strip is ignored


def test_generated_tree_is_cityscapes_layout(gen_root):
  source = CityscapesSource(str(gen_root), "train")
  assert len(source) == 10 and len(CityscapesSource(str(gen_root), "val")) == 5
  example = source[0]
  raw = np.asarray(Image.open(source.items[0][1]))
  assert example["image"].shape == (64, 128, 3) and example["image"].dtype == np.uint8
  np.testing.assert_array_equal(example["label"], CITYSCAPES_ID_TO_TRAIN[raw])
  # Reusing the tree with other settings is refused, naming both.
  with pytest.raises(ValueError, match="other settings"):
    generated.write_dataset(str(gen_root), 11, 5, (64, 128), seed=0)


@pytest.fixture(params=["local", "bucket"])
def tree(request, tmp_path, monkeypatch):
  """(a local directory to write a dataset tree in, the config.data.root that reads it):
  the directory itself, or gs://bucket/tree redirected to it (tests/buckets.py)."""
  if request.param == "local":
    yield tmp_path, str(tmp_path)
    return
  monkeypatch.chdir(tmp_path)
  with buckets.mock_bucket(tmp_path / "bucket"):
    (tmp_path / "bucket" / "tree").mkdir()
    yield tmp_path / "bucket" / "tree", "gs://bucket/tree"
  assert not (tmp_path / "gs:").exists()  # nothing went to a local "gs:" directory


def _write(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


def test_cityscapes_label_mapping_and_train_ids(tree):
  local, root = tree
  img = np.zeros((8, 16, 3), np.uint8)
  ids = np.array([[7, 8, 11, 0, 26, 33, 1, 24]] * 8, np.uint8).repeat(2, axis=1)
  _write(str(local / "cs/leftImg8bit/val/aachen/a_000000_000001_leftImg8bit.png"), img)
  _write(str(local / "cs/gtFine/val/aachen/a_000000_000001_gtFine_labelIds.png"), ids)
  source = CityscapesSource(f"{root}/cs", "val")
  assert source.items[0][:2] == (
    f"{root}/cs/leftImg8bit/val/aachen/a_000000_000001_leftImg8bit.png",
    f"{root}/cs/gtFine/val/aachen/a_000000_000001_gtFine_labelIds.png",
  )
  got = source[0]["label"]
  assert got[0, ::2].tolist() == [0, 1, 2, 255, 13, 18, 255, 11]
  assert CITYSCAPES_NAMES[13] == "car"
  # *_labelTrainIds.png is used as is when present.
  train_ids = np.full((8, 16), 5, np.uint8)
  _write(str(local / "cs/gtFine/val/aachen/a_000000_000001_gtFine_labelTrainIds.png"), train_ids)
  assert (CityscapesSource(f"{root}/cs", "val")[0]["label"] == 5).all()


def test_bad_layouts_are_named(tree):
  local, root = tree
  with pytest.raises(UserError, match="not a directory.*leftImg8bit"):
    CityscapesSource(f"{root}/missing", "train")
  (local / "leftImg8bit").mkdir()
  with pytest.raises(UserError, match="no split 'train'.*leftImg8bit/train"):
    CityscapesSource(root, "train")
  image = local / "leftImg8bit/train/x/x_1_2_leftImg8bit.png"
  _write(str(image), np.zeros((4, 4, 3), np.uint8))
  with pytest.raises(UserError, match="has no label: expected .*x_1_2_gtFine_labelIds.png"):
    CityscapesSource(root, "train")
  _write(str(local / "gtFine/train/x/x_1_2_gtFine_labelIds.png"), np.full((4, 4), 40, np.uint8))
  _write(str(local / "gtFine/train/x/y_1_2_gtFine_labelIds.png"), np.zeros((4, 4), np.uint8))
  with pytest.raises(UserError, match="label .*y_1_2_gtFine_labelIds.png has no image"):
    CityscapesSource(root, "train")
  os.remove(local / "gtFine/train/x/y_1_2_gtFine_labelIds.png")
  with pytest.raises(UserError, match="label ids up to 40"):
    CityscapesSource(root, "train")[0]
  image.write_bytes(b"not a png")
  with pytest.raises(UserError, match="cannot decode image .*x_1_2_leftImg8bit.png"):
    CityscapesSource(root, "train")[0]


def test_two_writers_of_one_generated_tree_both_succeed(tmp_path, monkeypatch):
  """Processes that generate the same tree at once (a multi-process run): the one
  that finishes second keeps the first one's tree and carries on."""
  root = str(tmp_path / "tree")
  original = generated.generate_scene
  calls = []

  def racing(seed, index, size):
    if not calls:  # while this writer is busy, another one finishes
      calls.append(index)
      monkeypatch.setattr(generated, "generate_scene", original)
      generated.write_dataset(root, 2, 1, (32, 64), seed=0)
      monkeypatch.setattr(generated, "generate_scene", racing)
    return original(seed, index, size)

  monkeypatch.setattr(generated, "generate_scene", racing)
  assert generated.write_dataset(root, 2, 1, (32, 64), seed=0) == root
  assert calls and len(CityscapesSource(root, "train")) == 2
  assert [p for p in os.listdir(tmp_path) if p.startswith(".generating")] == []


def test_train_iterator_shuffles_per_epoch_resumes_and_shards(gen_root):
  config = _config(gen_root)
  it = data.make_train_iterator(config)
  batches = [next(it) for _ in range(12)]  # 10 examples, batch 2: 5 per epoch
  assert batches[0]["image"].shape == (2, 64, 128, 3)
  assert batches[0]["label"].shape == (2, 16, 32)
  state = it.get_state()
  following = [next(it) for _ in range(3)]
  resumed = data.make_train_iterator(config)
  resumed.set_state(state)
  for a, b in zip(following, [next(resumed) for _ in range(3)]):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  # Another epoch sees the images in another order.
  first = np.stack([b["image"][:, 0, 0, 0] for b in batches[:5]])
  second = np.stack([b["image"][:, 0, 0, 0] for b in batches[5:10]])
  assert not np.array_equal(first, second)
  # Each of two processes reads its half of every global batch: together they see
  # exactly the single-process batches, and their states (batches read) agree.
  halves = [data.make_train_iterator(config, process_index=i, process_count=2) for i in (0, 1)]
  for alone in batches[:7]:
    parts = [next(h) for h in halves]
    assert parts[0]["image"].shape[0] == parts[1]["image"].shape[0] == 1
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), alone[key])
  assert halves[0].get_state() == halves[1].get_state()
  one = data.make_train_iterator(config)
  one.set_state(halves[0].get_state())  # a 2-process state resumes a 1-process run
  np.testing.assert_array_equal(next(one)["image"], batches[7]["image"])
  # Two batches read ahead onto the device: its state is that after the last batch
  # handed out, and a checkpoint of it resumes with the next one.
  ahead = data.DevicePrefetch(data.make_train_iterator(config), lambda b: b["label"] + 0, depth=2)
  for alone in batches[:3]:
    np.testing.assert_array_equal(next(ahead), alone["label"])
  plain = data.make_train_iterator(config)
  [next(plain) for _ in range(3)]
  assert ahead.get_state() == plain.get_state()
  resumed = data.DevicePrefetch(data.make_train_iterator(config), lambda b: b["label"] + 0)
  resumed.set_state(ahead.get_state())
  np.testing.assert_array_equal(next(resumed), batches[3]["label"])


def test_eval_iterator_pads_with_a_valid_mask(gen_root):
  config = _config(gen_root)
  batches = list(data.make_eval_iterator(config, "val"))  # 5 images, batch 2 -> 3 batches
  assert [b["valid"].tolist() for b in batches] == [[True, True], [True, True], [True, False]]
  two = [
    list(data.make_eval_iterator(config, "val", process_index=i, process_count=2)) for i in (0, 1)
  ]
  assert len(two[0]) == len(two[1])  # every process runs the same number of batches
  seen = [img.tobytes() for p in two for b in p for img, ok in zip(b["image"], b["valid"]) if ok]
  alone = [img.tobytes() for b in batches for img, ok in zip(b["image"], b["valid"]) if ok]
  assert len(seen) == 5 and sorted(seen) == sorted(alone)  # disjoint shards, all images
  config.data.eval_label_resolution = "full"
  assert next(data.make_eval_iterator(config, "val"))["label"].shape == (2, 64, 128)


def test_reading_ahead_is_bounded_whatever_the_consumer(gen_root, monkeypatch):
  """A stalled consumer: the readers stop after config.data.prefetch batches (grain's own
  default reads 500 ahead); the batches are uint8 pixels."""
  read = []

  class Counting:
    def __init__(self, source):
      self.source = source

    def __len__(self):
      return len(self.source)

    def __getitem__(self, i):
      read.append(i)
      return self.source[i]

  real = pipeline.make_source
  monkeypatch.setattr(pipeline, "make_source", lambda *a: Counting(real(*a)))
  config = _config(gen_root, prefetch=2)  # 10 training examples, endless
  it = data.make_train_iterator(config)
  assert next(it)["image"].dtype == np.uint8
  time.sleep(1.0)
  # The batch handed over, 2 buffered, 2 being read by the 2 threads: 5 batches of 2.
  assert 2 <= len(read) <= 5 * 2, len(read)


def test_auto_workers_follow_the_devices_and_cpus(monkeypatch):
  config = base_config()
  cpu, gpu = types.SimpleNamespace(platform="cpu"), types.SimpleNamespace(platform="gpu")
  assert pipeline.num_workers(config, [cpu]) == 0  # the step needs the cores
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)))
  assert pipeline.num_workers(config, [gpu]) == 11
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(96)))
  assert pipeline.num_workers(config, [gpu]) == 16
  config.data.num_workers = 3
  assert pipeline.num_workers(config, [gpu]) == 3
  config.data.num_workers = "many"
  with pytest.raises(
    UserError, match="config.data.num_workers must be a non-negative integer or 'auto', got 'many'"
  ):
    validate_config(config)


def test_iterator_with_worker_processes_resumes_and_outlives_sigterm(gen_root):
  """Worker processes ignore SIGTERM (SLURM signals every process of a step): the run
  reads on while it saves."""
  import multiprocessing
  import os
  import signal

  config = _config(gen_root, num_workers=1)
  before = set(multiprocessing.active_children())
  it = data.make_train_iterator(config)
  next(it)
  workers = set(multiprocessing.active_children()) - before
  assert workers
  for worker in workers:
    os.kill(worker.pid, signal.SIGTERM)
  state = it.get_state()
  expected = next(it)
  assert all(w.is_alive() for w in workers)
  resumed = data.make_train_iterator(config)
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["image"], expected["image"])


def test_acdc_conditions_and_layout(tree):
  local, root = tree
  for condition in ("fog", "night"):
    for i in range(2):
      stem = f"GOPR0{i}_frame_00000{i}"
      _write(
        str(local / f"rgb_anon/{condition}/val/GOPR0{i}/{stem}_rgb_anon.png"),
        np.zeros((4, 8, 3), np.uint8),
      )
      _write(
        str(local / f"gt/{condition}/val/GOPR0{i}/{stem}_gt_labelIds.png"),
        np.full((4, 8), 26, np.uint8),
      )  # car
  cfg = data.default_data_config(name="acdc", root=root, conditions="fog")
  fog = make_source(cfg, "val")
  assert len(fog) == 2 and (fog[0]["label"] == 13).all()
  cfg.conditions = "fog,night"
  assert len(make_source(cfg, "val")) == 4
  cfg.conditions = "all"  # rain and snow are missing: named
  with pytest.raises(UserError, match="no split 'val' for condition 'rain'"):
    make_source(cfg, "val")
  cfg.conditions = "haze"
  with pytest.raises(UserError, match="unknown ACDC condition.*haze"):
    make_source(cfg, "val")


def test_voc_lists_palette_labels_and_errors(tree):
  local, root = tree
  for d in ("ImageSets/Segmentation", "JPEGImages", "SegmentationClass"):
    os.makedirs(local / d)
  (local / "ImageSets/Segmentation/val.txt").write_text("2007_000032\n2007_000033\n")
  for name, cls in (("2007_000032", 1), ("2007_000033", 15)):
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(local / f"JPEGImages/{name}.jpg")
    label = np.full((6, 6), cls, np.uint8)
    label[0] = 255  # object borders: ignored
    palette_png = Image.fromarray(label, mode="P")
    palette_png.putpalette(data.PALETTES["voc"].ravel().tolist())
    palette_png.save(local / f"SegmentationClass/{name}.png")
  cfg = data.default_data_config(name="voc", root=root)
  source = make_source(cfg, "val")
  assert len(source) == 2 and source[1]["label"][1, 0] == 15 and source[1]["label"][0, 0] == 255
  with pytest.raises(UserError, match="no split 'train_aug'.*train_aug.txt is missing"):
    make_source(cfg, "train_aug")
  bad = np.full((6, 6), 30, np.uint8)
  Image.fromarray(bad).save(local / "SegmentationClass/2007_000032.png")
  with pytest.raises(UserError, match=r"2007_000032.png holds values \[30\]"):
    make_source(cfg, "val")[0]


def test_nyuv2_layout_shifts_labels_and_names_errors(tree):
  local, root = tree
  for d in ("images", "labels40"):
    os.makedirs(local / d)
  (local / "test.txt").write_text("0002\n0001\n")
  label = np.arange(48, dtype=np.uint8).reshape(6, 8) % 41  # 0 (unlabelled) .. 40
  for name in ("0001", "0002"):
    Image.fromarray(np.full((6, 8, 3), 7, np.uint8)).save(local / f"images/{name}.jpg")
    Image.fromarray(label).save(local / f"labels40/{name}.png")
  cfg = data.default_data_config(name="nyuv2", root=root)
  source = make_source(cfg, "test")
  example = source[0]
  assert len(source) == 2 and example["name"] == "0001"
  expected = np.where(label == 0, 255, label.astype(np.int32) - 1)
  np.testing.assert_array_equal(example["label"], expected)
  assert len(data.CLASS_NAMES["nyuv2"]) == 40 and data.PALETTES["nyuv2"].shape == (40, 3)
  with pytest.raises(UserError, match="no split 'train'.*train.txt is missing"):
    make_source(cfg, "train")
  Image.fromarray(np.full((6, 8), 41, np.uint8)).save(local / "labels40/0002.png")
  with pytest.raises(UserError, match=r"0002.png holds values \[41\]"):
    source[1]
  os.remove(local / "images/0001.jpg")
  with pytest.raises(UserError, match="lists '0001' but .*0001.jpg is missing"):
    make_source(cfg, "test")


def test_skip_bad_files_counts_what_it_skipped(gen_root, tmp_path):
  root = tmp_path / "tree"
  shutil.copytree(gen_root, root)
  images = sorted((root / "leftImg8bit" / "val").glob("*/*.png"))
  images[1].write_bytes(b"not a png")
  strict = CityscapesSource(str(root), "val")
  with pytest.raises(UserError, match=f"cannot decode image .*{images[1].name}"):
    strict[1]
  cfg = data.default_data_config(name="cityscapes", root=str(root), skip_bad_files=True)
  source = make_source(cfg, "val")
  with pytest.warns(UserWarning, match="skipping a bad file"):
    example = source[1]
  assert example["skipped"] == 1 and example["name"] == strict[2]["name"]
  assert source[0]["skipped"] == 0
  config = _config(root, name="cityscapes", skip_bad_files=True)
  with pytest.warns(UserWarning):
    batches = list(data.make_eval_iterator(config, "val"))
  assert sum(int(b["skipped"].sum()) for b in batches) == 1
