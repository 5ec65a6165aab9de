"""The folder dataset (data/folder.py): pairing, splits, the class file, named errors, the
grain pipeline's exact resume, gs:// roots, browse and the worked example's writer."""

import json
import os

import buckets
import numpy as np
import pytest
from PIL import Image
from runs import REPO, load_config

from transkd_jax import data
from transkd_jax.data import browse, classes, folder, folder_example
from transkd_jax.data.datasets import DATASETS, check_config, make_source
from transkd_jax.errors import UserError

SIZE = (16, 32)
NAMES = ["road", "car", "sky"]
PALETTE = [[10, 20, 30], [40, 50, 60], [70, 80, 90]]


def _image(path, seed, size=SIZE):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(path)


def _mask(path, values, size=SIZE):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  mask = np.resize(np.asarray(values, np.uint8), size[0] * size[1]).reshape(size)
  Image.fromarray(mask).save(path)


def _classes(root, name="classes.json", **value):
  value = {"names": NAMES, **value}
  with open(os.path.join(root, name), "w") as f:
    json.dump(value, f)


def _folder(root, stems=("a.png", "b.jpg", "sub/c.jpeg"), values=(0, 1, 2, 255), **classes):
  """Images (one per stem, its extension), masks and a class file under ``root``."""
  root = str(root)
  for i, name in enumerate(stems):
    _image(os.path.join(root, "images", name), i)
    _mask(os.path.join(root, "masks", os.path.splitext(name)[0] + ".png"), values)
  os.makedirs(root, exist_ok=True)
  _classes(root, **classes)
  return root


def _cfg(root, **keys):
  return data.default_data_config(name="folder", root=str(root), **keys)


def _lists(root, **splits):
  os.makedirs(os.path.join(root, "splits"), exist_ok=True)
  for split, lines in splits.items():
    with open(os.path.join(root, "splits", f"{split}.txt"), "w") as f:
      f.write("".join(line + "\n" for line in lines))


def test_pairs_by_stem_across_png_jpg_jpeg(tmp_path):
  root = _folder(tmp_path)
  pairs = folder.pair_by_stem(f"{root}/images", f"{root}/masks")
  assert list(pairs) == ["a", "b", "sub/c"]
  assert [os.path.basename(image) for image, _ in pairs.values()] == ["a.png", "b.jpg", "c.jpeg"]
  _lists(root, train=["a", "sub/c"], val=["b.jpg"])  # a line may be a file name
  source = make_source(_cfg(root, folder_splits="splits"), "train")
  assert [name for *_, name in source.items] == ["a", "sub/c"]
  example = source[1]
  assert example["image"].shape == (*SIZE, 3) and example["name"] == "sub/c"
  np.testing.assert_array_equal(
    example["image"], np.asarray(Image.open(f"{root}/images/sub/c.jpeg"))
  )
  assert example["label"].dtype == np.uint8
  assert example["label"].ravel()[:5].tolist() == [0, 1, 2, 255, 0]
  assert len(make_source(_cfg(root, folder_splits="splits"), "val")) == 1


def test_list_file_splits_and_their_errors(tmp_path):
  root = _folder(tmp_path)
  cfg = _cfg(root, folder_splits="splits")
  _lists(root, train=["b", "a"], val=[], test=["a", "nope", "gone"])
  assert [n for *_, n in make_source(cfg, "train").items] == ["b", "a"]  # as listed
  with pytest.raises(UserError, match=r"split 'val' is empty: its list file .*splits/val.txt"):
    make_source(cfg, "val")
  with pytest.raises(UserError, match=r"test.txt lists 'nope' \(and 1 more\), which is no image"):
    make_source(cfg, "test")
  with pytest.raises(UserError, match=r"no split 'extra': .*splits/extra.txt is missing"):
    make_source(cfg, "extra")


def test_the_seeded_fraction_is_deterministic_disjoint_and_covering(tmp_path):
  stems = [f"s{i:02d}" for i in range(50)]
  split = folder.fraction_split(reversed(stems), 0.2, seed=3)
  assert split == folder.fraction_split(stems, 0.2, seed=3)  # sorted first: any listing order
  assert len(split["val"]) == 10 and not set(split["val"]) & set(split["train"])
  assert sorted(split["val"] + split["train"]) == stems and split["train"] == sorted(split["train"])
  assert folder.fraction_split(stems, 0.2, seed=4)["val"] != split["val"]
  root = _folder(tmp_path, stems=[f"{s}.png" for s in stems[:5]])
  cfg = _cfg(root, folder_val_fraction=0.4, folder_split_seed=1)
  train, val = (make_source(cfg, s) for s in ("train", "val"))
  assert len(train) == 3 and len(val) == 2
  assert {n for *_, n in train.items} | {n for *_, n in val.items} == set(stems[:5])
  with pytest.raises(UserError, match="no split 'test': config.data.folder_splits is empty"):
    make_source(cfg, "test")
  cfg.folder_val_fraction = 0.05
  with pytest.raises(
    UserError,
    match=r"split 'val' is empty: .* the 5 pairs .* config.data.folder_val_fraction=0.05 "
    r"\(seed config.data.folder_split_seed=1\)",
  ):
    make_source(cfg, "val")


def test_the_class_file_maps_ignores_and_colours(tmp_path):
  root = _folder(tmp_path, values=(7, 26, 23, 0, 1))
  _classes(root, map={"7": 0, "26": 1, "23": 2, "1": 255}, ignore=0, palette=PALETTE)
  cfg = _cfg(root, folder_val_fraction=0.0)
  label = make_source(cfg, "train")[0]["label"]
  assert label.ravel()[:5].tolist() == [0, 1, 2, 255, 255]  # mapped, ignore (0), mapped to 255
  assert DATASETS["folder"].num_classes(cfg) == 3
  assert classes.class_names(cfg, 3) == tuple(NAMES)
  np.testing.assert_array_equal(classes.palette(cfg, 3), np.array(PALETTE, np.uint8))
  # No palette: the numbered classes' colours; YAML the same as JSON.
  with open(os.path.join(root, "classes.yaml"), "w") as f:
    f.write("names: [road, car, sky]\nignore: 0\nmap: {7: 0, 26: 1, 23: 2, 1: 255}\n")
  yaml_cfg = _cfg(root, folder_classes="classes.yaml", folder_val_fraction=0.0)
  check_config(yaml_cfg)
  np.testing.assert_array_equal(make_source(yaml_cfg, "train")[0]["label"], label)
  np.testing.assert_array_equal(
    classes.palette(yaml_cfg, 3), data.classes.ClassTable.numbered(3).palette
  )
  # Without a map the stored values are the train ids, the ignore value 255 by default.
  _classes(root)
  assert folder.read_classes(f"{root}/classes.json").lut[[0, 2, 3, 255]].tolist() == [0, 2, -1, 255]


@pytest.mark.parametrize(
  "value,match",
  [
    ([], "holds a list"),
    ({"names": NAMES, "colours": []}, r"unknown key\(s\) \['colours'\]"),
    ({"palette": PALETTE}, "has no 'names'"),
    ({"names": ["a", "a"]}, "'names' must be a list of distinct names"),
    ({"names": NAMES, "palette": PALETTE[:2]}, "'palette' must be 3 colours"),
    ({"names": NAMES, "ignore": 300}, "'ignore' must be a stored value 0-255, got 300"),
    ({"names": NAMES, "ignore": 1}, "'ignore' must be a value that is no train id .*'car'"),
    ({"names": NAMES, "map": {"7": 3}}, r"map\['7'\] must be a train id 0-2 .*got 3"),
    ({"names": NAMES, "map": {"x": 0}}, "'map' must be keyed by stored values 0-255, got 'x'"),
    ({"names": NAMES, "map": {"255": 0}}, "absent: 255 is the ignore value"),
  ],
)
def test_a_bad_class_file_is_named(tmp_path, value, match):
  path = str(tmp_path / "classes.json")
  with open(path, "w") as f:
    json.dump(value, f)
  with pytest.raises(UserError, match=f"class file {path}.*{match}"):
    folder.read_classes(path)


def test_an_unreadable_or_missing_class_file_is_named(tmp_path):
  root = _folder(tmp_path)
  with open(os.path.join(root, "classes.json"), "w") as f:
    f.write("{names: [")
  with pytest.raises(UserError, match=r"class file .*classes.json is not valid JSON"):
    make_source(_cfg(root), "train")
  with pytest.raises(UserError, match=r"class file .*other.json is missing"):
    classes.class_names(_cfg(root, folder_classes="other.json"), 3)


def test_bad_input_is_named(tmp_path):
  root = _folder(tmp_path)
  cfg = _cfg(root, folder_val_fraction=0.0)
  _mask(f"{root}/masks/lonely.png", [0])
  with pytest.raises(UserError, match=r"mask .*masks/lonely.png has no image: expected .*lonely"):
    make_source(cfg, "train")
  _image(f"{root}/images/lonely.jpg", 9)
  _image(f"{root}/images/alone.png", 9)
  with pytest.raises(UserError, match=r"image .*images/alone.png has no mask: .*masks/alone.png"):
    make_source(cfg, "train")
  os.remove(f"{root}/images/alone.png")
  _image(f"{root}/images/lonely.png", 9)
  with pytest.raises(UserError, match=r"images .*lonely.jpg and .*lonely.png share the stem"):
    make_source(cfg, "train")
  os.remove(f"{root}/images/lonely.png")
  source = make_source(cfg, "train")
  assert [n for *_, n in source.items] == ["a", "b", "lonely", "sub/c"]
  _mask(f"{root}/masks/b.png", [1, 9, 200])  # outside 0-2 and the ignore value
  with pytest.raises(UserError, match=r"mask .*masks/b.png holds values \[9, 200\] that the cl"):
    source[1]
  _mask(f"{root}/masks/lonely.png", [0], size=(8, 32))
  with pytest.raises(UserError, match=r"image .*lonely.jpg is 32x16 but its label .*lonely.png is"):
    source[2]
  _classes(root, map={"1": 0, "2": 1})
  with pytest.raises(UserError, match=r"holds values \[0\] that .*classes.json maps to no cl"):
    make_source(cfg, "train")[0]  # a: 0, 1, 2, 255
  Image.fromarray(np.zeros((*SIZE, 3), np.uint8)).save(f"{root}/masks/a.png")
  with pytest.raises(UserError, match=r"label .*masks/a.png has shape \(16, 32, 3\); expected a s"):
    make_source(cfg, "train")[0]
  with pytest.raises(UserError, match="config.data.folder_masks='labels': .* is not a directory"):
    make_source(_cfg(root, folder_masks="labels"), "train")
  with pytest.raises(UserError, match="config.data.root: '' is not a directory; expected the lay"):
    make_source(_cfg(""), "train")


@pytest.mark.parametrize(
  "key,value",
  [
    ("folder_images", ""),
    ("folder_masks", "images/"),
    ("folder_classes", "classes.txt"),
    ("folder_val_fraction", 1.5),
    ("folder_split_seed", -1),
  ],
)
def test_each_bad_key_is_named_without_touching_files(key, value):
  cfg = _cfg("/no/such/dir")
  check_config(cfg)
  cfg[key] = value
  with pytest.raises(UserError, match=f"config.data.{key} must be .*, got {value!r}"):
    check_config(cfg)


def _train_config(root, **data_keys):
  config = load_config(REPO / "configs" / "folder.py")
  config.update(batch_size=2, seed=5, image_size=SIZE, num_classes=3)
  config.data.update(root=str(root), num_workers=0, **data_keys)
  return config


def test_the_train_iterator_resumes_exactly(tmp_path):
  root = _folder(tmp_path, stems=[f"s{i}.png" for i in range(6)])
  config = _train_config(root, folder_val_fraction=0.0)
  it = data.make_train_iterator(config)
  [next(it) for _ in range(4)]  # past an epoch (3 batches)
  state = it.get_state()
  following = [next(it) for _ in range(3)]
  resumed = data.make_train_iterator(config)
  resumed.set_state(state)
  for a, b in zip(following, [next(resumed) for _ in range(3)]):
    assert a["image"].shape == (2, *SIZE, 3) and a["label"].shape == (2, 4, 8)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  config.num_classes = 19  # a config's default, not the class file's 3
  with pytest.raises(UserError, match=r"config.num_classes=19, but .*classes.json\) are 3"):
    data.make_train_iterator(config)


def test_a_gs_root_reads_through_the_bucket(tmp_path):
  with buckets.mock_bucket(tmp_path / "bucket") as local:
    _folder(os.path.join(local, "set"))
    _lists(os.path.join(local, "set"), train=["a", "sub/c"], val=["b"])
    cfg = _cfg("gs://bucket/set", folder_splits="splits")
    source = make_source(cfg, "train")
    assert [image for image, *_ in source.items] == [
      "gs://bucket/set/images/a.png",
      "gs://bucket/set/images/sub/c.jpeg",
    ]
    assert source[1]["label"].ravel()[:4].tolist() == [0, 1, 2, 255]
    assert classes.class_names(cfg, 3) == tuple(NAMES)
    _mask(os.path.join(local, "set", "masks", "x.png"), [0])
    with pytest.raises(UserError, match="mask gs://bucket/set/masks/x.png has no image"):
      make_source(cfg, "val")
  assert not os.path.exists("gs:")


def test_browse_shows_a_folder_example_in_its_palette(tmp_path, capsys):
  root = _folder(tmp_path / "set", values=(0, 1, 2), palette=PALETTE)
  argv = [
    "browse",
    f"--config={REPO / 'configs' / 'folder.py'}",
    f"--config.data.root={root}",
    "--config.num_classes=3",
    "--config.image_size=(32,64)",
    "--config.data.folder_val_fraction=0.4",
    f"--outdir={tmp_path / 'out'}",
  ]
  assert browse.cli(argv) == 0
  written = capsys.readouterr().out.split()
  assert [p.rsplit("_", 1)[-1] for p in written] == ["image.png", "label.png", "overlay.png"]
  label = np.asarray(Image.open(written[1]))
  assert label.shape == (*SIZE, 3)  # the standard protocol's: the mask's own size
  assert {tuple(c) for c in label.reshape(-1, 3)} == {tuple(c) for c in PALETTE}


def test_the_example_writer(tmp_path, capsys):
  root = tmp_path / "example"
  assert folder_example.cli(["x", str(root), "--count=3", "--size=16x32"]) == 0
  assert "wrote 3 scenes (16x32)" in capsys.readouterr().out
  assert sorted(os.listdir(root / "images")) == [f"scene_000{i}.jpg" for i in range(3)]
  cfg = _cfg(root, folder_val_fraction=0.34)
  check_config(cfg)
  assert classes.class_names(cfg, 7) == folder_example.NAMES
  assert len(make_source(cfg, "train")) == 2 and len(make_source(cfg, "val")) == 1
  stored = np.asarray(Image.open(root / "masks" / "scene_0000.png"))
  expected = folder.read_classes(str(root / "classes.json")).lut[stored]
  np.testing.assert_array_equal(make_source(cfg, "train")[0]["label"], expected)
  assert set(np.unique(expected)) - {255} <= set(range(7))
  assert folder_example.cli(["x", str(root), "--count=3"]) == 2
  assert "images exists; write the example to a new directory" in capsys.readouterr().err
  assert folder_example.cli(["x", str(tmp_path / "new"), "--size=16"]) == 2
