"""Config validation: every problem named by its key, once, before anything is built."""

import re

import ml_collections
import pytest
from runs import REPO, load_config

from transkd_jax.config import base_config, resolve_batch_size, validate_config
from transkd_jax.errors import UserError


def test_every_config_file_validates():
  classes, pairs = {}, {}
  for path in sorted((REPO / "configs").glob("*.py")):
    config = load_config(path)
    validate_config(config)
    classes[path.stem] = config.num_classes
    pairs[path.stem] = (
      f"{config.teacher.arch}-{config.teacher.variant}>"
      f"{config.student.arch}-{config.student.variant}"
    )
  assert classes == {
    "acdc": 19,
    "cityscapes": 19,
    "cityscapes_lvt": 19,
    "cityscapes_pvtv2": 19,
    "folder": 7,  # its example's class file (data/folder_example.py)
    "nyuv2": 40,
    "quickstart": 19,
    "synthetic": 19,
    "voc": 21,
  }
  assert pairs["cityscapes_pvtv2"] == "pvtv2-b2>pvtv2-b0"
  assert pairs["cityscapes_lvt"] == "segformer-b2>lvt-lvt"


def _set(config, key, value):
  """config's dotted ``key`` (e.g. "teacher.variant") set to ``value``."""
  *parents, last = key.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[last] = value


@pytest.mark.parametrize(
  "key,value,needle",
  [
    ("method", "transkd", "unknown distillation method 'transkd'"),
    ("batch_size", -2, "config.batch_size must be a non-negative integer"),
    ("per_device_batch_size", -1, "config.per_device_batch_size must be a non-negative"),
    ("eval_every", -1, "config.eval_every must be a non-negative integer"),
    ("eval_protocol", "mmseg", "config.eval_protocol must be one of"),
    ("dtype", "float64", "config.dtype must be one of"),
    ("dtype", "float16", "needs loss scaling.*--config.dtype=bfloat16"),
    ("sharding", "zero3", "config.sharding must be one of"),
    ("mesh_shape", (-1, -1), "config.mesh_shape must be (data, model)"),
    ("data.transforms", "segformer", "config.data.transforms must be one of"),
    ("data.name", "kitti", "config.data.name must be one of"),
    ("optimizer.warmup_steps", 10**9, "config.optimizer.warmup_steps"),
    ("recipe.methods", ("student", "nope"), "unknown distillation method 'nope'"),
    ("recipe.seeds", 0, "config.recipe.seeds must be a positive integer"),
    ("distill.pea_weights", (0.1, 0.1), "config.distill.pea_weights needs 4 values"),
  ],
)
def test_a_bad_value_is_named(key, value, needle):
  config = base_config()
  with config.unlocked():
    _set(config, key, value)
  with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")):
    validate_config(config)


@pytest.mark.parametrize(
  "key,value,needle",
  [
    ("teacher.variant", "b9", "config.teacher.variant"),
    ("student.arch", "resnet", "config.student.arch: Unknown architecture 'resnet'"),
    ("student.arch", "lvt", "config.student.variant (config.student.arch='lvt')"),
    ("num_classes", 0, "config.num_classes"),
    ("num_classes", 21, "config.class_weights has 19 entries"),
  ],
)
def test_a_bad_override_of_a_config_file_is_named(key, value, needle):
  config = load_config(REPO / "configs" / "cityscapes.py")
  _set(config, key, value)
  with pytest.raises(UserError, match=re.escape(needle)):
    validate_config(config)


def test_a_config_not_built_on_base_config_names_what_it_lacks():
  config = base_config()
  del config["eval"]
  with pytest.raises(UserError, match="lacks config.eval.*base_config"):
    validate_config(config)
  with pytest.raises(UserError, match="lacks config.batch_size"):
    validate_config(ml_collections.ConfigDict({"num_classes": 19}))


def test_exactly_one_batch_size_is_set_and_per_device_resolves_to_global():
  config = load_config(REPO / "configs" / "cityscapes.py")
  assert (config.batch_size, config.per_device_batch_size) == (0, 2)
  validate_config(config)
  assert resolve_batch_size(config, 4) == "global batch 8 (2 per device x 4 devices)"
  assert (config.batch_size, config.per_device_batch_size) == (8, 0)
  validate_config(config)  # resolved, it is a plain global batch
  assert resolve_batch_size(config, 4) == "global batch 8 (config.batch_size) over 4 devices"
  for batch, per_device in ((8, 2), (0, 0)):
    _set(config, "batch_size", batch)
    _set(config, "per_device_batch_size", per_device)
    with pytest.raises(UserError, match="set exactly one of them"):
      validate_config(config)
