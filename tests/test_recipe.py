"""The recipe, as a smoke test: a tiny teacher and one distilled student produce
the table, the chart and the JSON; a second invocation skips the finished runs.
(The ordering of the numbers is the full recipe's business, not this test's.)"""

import json

import pytest
from PIL import Image

from runs import REPO, load_config, tiny_config
from transkd_jax import recipe
from transkd_jax.errors import UserError


def _config(tmp_path, methods=("transkd_base",)):
  config = tiny_config(tmp_path / "data", total_steps=2)
  config.recipe.teacher_steps = 2
  config.recipe.methods = methods
  return config


def test_recipe_writes_the_table_and_skips_finished_runs(tmp_path, capsys):
  config = _config(tmp_path)
  out = recipe.run_recipe(config, str(tmp_path / "recipe"))
  assert list(out["runs"]) == ["teacher", "transkd_base"]
  table = (tmp_path / "recipe" / "results.md").read_text()
  rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
  assert [r.split("|")[1].strip() for r in rows] == ["method", "teacher", "transkd_base"]
  assert "standard` protocol" in table and "2 steps each" in table
  for name in ("teacher", "transkd_base"):
    results = json.loads((tmp_path / "recipe" / name / "eval_results.json").read_text())
    assert 0 <= results["miou"] <= 1 and results["num_images"] == 4
    assert f"{100 * results['miou']:.2f}" in table
  assert Image.open(tmp_path / "recipe" / "results.png").size[0] > 200
  saved = json.loads((tmp_path / "recipe" / "results.json").read_text())
  assert saved["runs"]["transkd_base"]["steps"] == 2
  capsys.readouterr()
  again = recipe.run_recipe(config, str(tmp_path / "recipe"))  # nothing left to train
  assert capsys.readouterr().out.count("finished earlier") == 2
  assert again["runs"]["transkd_base"]["eval"] == out["runs"]["transkd_base"]["eval"]


def test_unknown_method_is_named(tmp_path):
  with pytest.raises(UserError, match="config.recipe.methods"):
    recipe.run_configs(_config(tmp_path, methods=("transkd_base", "nope")))


def test_the_student_alone_row_can_have_the_public_scripts_budget(tmp_path):
  config = _config(tmp_path, methods=("student", "transkd_base"))
  config.recipe.update(student_batch_size=4, student_steps=5, student_decay_steps=9)
  runs = recipe.run_configs(config)
  student, distilled = runs["student"], runs["transkd_base"]
  assert (student.batch_size, student.total_steps, student.optimizer.decay_steps) == (4, 5, 9)
  assert (distilled.batch_size, distilled.total_steps) == (config.batch_size, 2)
  assert distilled.optimizer.decay_steps == config.optimizer.decay_steps
  cityscapes = load_config(REPO / "configs" / "cityscapes.py")
  assert (cityscapes.recipe.student_batch_size, cityscapes.recipe.student_steps) == (4, 372000)
