"""The dataset table (data/datasets.py), the class tables it carries, and check_config."""

import ast
import os
import re

import ml_collections
import numpy as np
import pytest

from transkd_jax import data
from transkd_jax.data import classes, labels, transforms
from transkd_jax.data.datasets import DATASETS, check_config, make_source
from transkd_jax.data.labels import ClassTable
from transkd_jax.errors import UserError

FIXED = {name: row for name, row in DATASETS.items() if isinstance(row.classes, ClassTable)}


def test_the_rows_and_their_class_counts():
  assert tuple(DATASETS) == ("cityscapes", "acdc", "nyuv2", "voc", "tfds", "generated", "folder")
  assert set(FIXED) == set(DATASETS) - {"tfds", "folder"}  # the config chooses (test_folder.py)
  for name, row in FIXED.items():
    table = row.classes
    cfg = data.default_data_config(name=name)
    assert row.name == name and row.layout and callable(row.build)
    assert row.num_classes(cfg) == table.num_classes == len(table.names), name
    assert table.palette.shape == (table.num_classes, 3) and table.palette.dtype == np.uint8
    assert classes.class_names(cfg, table.num_classes) == table.names
    assert classes.palette(cfg, table.num_classes) is table.palette
  counts = {name: row.classes.num_classes for name, row in FIXED.items()}
  assert counts == {"cityscapes": 19, "acdc": 19, "nyuv2": 40, "voc": 21, "generated": 19}
  assert classes.CLASS_NAMES["voc"] == classes.VOC_NAMES
  assert classes.PALETTES["nyuv2"] is classes.NYUV2_PALETTE


@pytest.mark.parametrize(
  "mapping,override,count,names",
  [
    ("train_ids", 0, 19, None),
    ("cityscapes_ids", 0, 19, classes.CITYSCAPES_NAMES),
    ("nyu40", 0, 40, None),
    ("classes", 7, 7, None),
  ],
)
def test_tfds_classes_follow_its_mapping(mapping, override, count, names):
  cfg = data.default_data_config(name="tfds", tfds_label_mapping=mapping, tfds_num_classes=override)
  row = DATASETS["tfds"]
  table = row.class_table(cfg)
  assert row.num_classes(cfg) == count
  assert len(table.names) == len(table.palette) == table.num_classes
  expected = names or tuple(f"class_{i}" for i in range(count))
  assert classes.class_names(cfg, count) == expected
  assert classes.palette(cfg, count).shape == (count, 3)


def test_names_and_colours_without_a_table_of_that_size():
  cfg = data.default_data_config(name="voc")
  assert classes.class_names(cfg, 3) == ("class_0", "class_1", "class_2")
  np.testing.assert_array_equal(classes.palette(cfg, 3), classes.bit_palette(4)[1:])


def test_an_unknown_dataset_is_named():
  with pytest.raises(
    UserError,
    match=r"config.data.name='kitti' is not known; expected one of "
    "cityscapes, acdc, nyuv2, voc, tfds, generated, folder",
  ):
    make_source(data.default_data_config(name="kitti"), "train")


def test_every_default_passes_and_no_file_is_touched():
  for name in DATASETS:
    keys = {"tfds_name": "my_set"} if name == "tfds" else {}
    check_config(data.default_data_config(name=name, root="/no/such/dir", **keys))
  check_config(data.default_data_config(transforms="mmseg", num_workers=3))
  check_config(data.default_data_config(name="acdc", conditions="fog, night"))


@pytest.mark.parametrize(
  "key,value,overrides",
  [
    ("name", "kitti", {}),
    ("transforms", "segformer", {}),
    ("eval_label_resolution", "half", {}),
    ("mmseg_scale", (1024,), {}),
    ("mmseg_scale", (-1, 2048), {}),
    ("mmseg_ratio_range", (2.0, 0.5), {}),
    ("mmseg_cat_max_ratio", 0.0, {}),
    ("mmseg_cat_max_ratio", "most", {}),
    ("num_workers", "many", {}),
    ("num_workers", -1, {}),
    ("prefetch", 0, {}),
    ("eval_label_pad", (500,), {}),
    ("conditions", "fog,haze", {"name": "acdc"}),
    ("tfds_name", "", {"name": "tfds"}),
    ("tfds_label_mapping", "labelids", {"name": "tfds", "tfds_name": "x"}),
    ("tfds_num_classes", -2, {"name": "tfds", "tfds_name": "x"}),
    ("num_train", -1, {}),
    ("generated_size", (0, 64), {}),
    ("root", "gs://bucket/generated", {"name": "generated"}),
    ("folder_classes", "classes.csv", {"name": "folder", "root": "/data"}),
  ],
)
def test_each_bad_key_is_named(key, value, overrides):
  cfg = ml_collections.ConfigDict(data.default_data_config(**overrides).to_dict(), type_safe=False)
  cfg[key] = value
  with pytest.raises(UserError, match=re.escape(f"config.data.{key}")) as info:
    check_config(cfg)
  if key not in ("conditions", "tfds_name"):  # theirs name the bad conditions / say "empty"
    assert repr(tuple(value) if isinstance(value, tuple) else value) in str(info.value)


def test_the_generated_tree_is_written_locally_only():
  cfg = data.default_data_config(name="generated", root="gs://bucket/generated")
  with pytest.raises(UserError, match="config.data.root must be a local directory"):
    make_source(cfg, "train")  # refused before anything is written


def test_the_validator_messages_match_the_configs():
  cfg = data.default_data_config(name="kitti")
  with pytest.raises(
    UserError, match=re.escape(f"config.data.name must be one of {tuple(DATASETS)}, got 'kitti'")
  ):
    check_config(cfg)
  cfg = data.default_data_config(transforms="segformer")
  with pytest.raises(
    UserError,
    match=re.escape(
      "config.data.transforms must be one of ('reference', 'aligned', 'mmseg'), got 'segformer'"
    ),
  ):
    check_config(cfg)


def test_mmseg_keys_fail_at_start_up_as_at_build():
  cfg = data.default_data_config(mmseg_ratio_range=(2.0, 0.5))
  with pytest.raises(UserError) as at_start:
    check_config(cfg)
  with pytest.raises(UserError) as at_build:
    transforms.mmseg_settings(cfg)
  assert str(at_start.value) == str(at_build.value)
  assert "config.data.mmseg_ratio_range=(2.0, 0.5) must be positive and increasing" in str(
    at_start.value
  )


def test_one_definition_of_the_shared_names():
  assert data.TRANSFORMS is transforms.TRANSFORMS
  assert classes.IGNORE is labels.IGNORE == 255
  assert classes.CITYSCAPES is DATASETS["cityscapes"].classes


def _data_imports(path):
  """The transkd_jax.data modules a file imports, and whether any import is in a function."""
  tree = ast.parse(open(path).read())
  found, nested = set(), []
  for node in ast.walk(tree):
    if isinstance(node, ast.FunctionDef):
      nested += [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
    if isinstance(node, ast.ImportFrom) and node.module:
      if node.module == "transkd_jax.data":
        found |= {alias.name for alias in node.names}
      elif node.module.startswith("transkd_jax.data."):
        found.add(node.module.split(".")[2])
  nested_ours = [
    n for n in nested if (getattr(n, "module", None) or n.names[0].name).startswith("transkd_jax")
  ]
  return found, nested_ours


def test_the_data_modules_import_without_cycles_or_in_function_imports():
  folder = os.path.dirname(data.__file__)
  modules = {f[:-3] for f in os.listdir(folder) if f.endswith(".py") and f != "__init__.py"}
  graph = {}
  for module in modules:
    found, nested = _data_imports(os.path.join(folder, module + ".py"))
    assert not nested, (module, [ast.dump(n) for n in nested])
    graph[module] = found & modules
  done, active = set(), []

  def visit(module):
    assert module not in active, f"import cycle: {' -> '.join(active + [module])}"
    if module in done:
      return
    active.append(module)
    for dep in graph[module]:
      visit(dep)
    active.pop()
    done.add(module)

  for module in sorted(graph):
    visit(module)
  assert "tfds_source" not in graph["sources"] and "sources" not in graph["tfds_source"]
