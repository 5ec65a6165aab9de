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
  # The student alone, to keep it short: a distilling row trained from the recipe's own
  # teacher is the README's first command (CI runs it), and the teacher's hand-over is
  # checked below (test_each_pair_gets_its_directory...).
  config = _config(tmp_path, methods=("student",))
  out = recipe.run_recipe(config, str(tmp_path / "recipe"))
  assert list(out["runs"]) == ["teacher", "student"]
  table = (tmp_path / "recipe" / "results.md").read_text()
  rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
  assert [r.split("|")[1].strip() for r in rows] == ["method", "teacher", "student"]
  assert "standard` protocol" in table and "2 steps each" in table
  for name in ("teacher", "student"):
    results = json.loads((tmp_path / "recipe" / name / "eval_results.json").read_text())
    assert 0 <= results["miou"] <= 1 and results["num_images"] == 4
    assert f"{100 * results['miou']:.2f}" in table
  assert Image.open(tmp_path / "recipe" / "results.png").size[0] > 200
  saved = json.loads((tmp_path / "recipe" / "results.json").read_text())
  assert saved["runs"]["student"]["steps"] == 2
  capsys.readouterr()
  again = recipe.run_recipe(config, str(tmp_path / "recipe"))  # nothing left to train
  assert capsys.readouterr().out.count("finished earlier") == 2
  assert again["runs"]["student"]["eval"] == out["runs"]["student"]["eval"]


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


def _pairs_config(tmp_path):
  config = _config(tmp_path, methods=("student", "transkd_base", "kd"))
  config.recipe.pairs = ("pvtv2-b2>pvtv2-b0", "segformer-b2>lvt", "pvtv2-b2>lvt")
  config.recipe.pair_methods = ("student", "transkd_base")
  config.recipe.pair_steps = 3
  config.recipe.pair_teacher_steps = 5
  return config


def test_pairs_name_their_models_and_budgets(tmp_path):
  config = _pairs_config(tmp_path)
  pairs = recipe.pairs_of(config)
  assert [(p.teacher, p.student, p.subdir) for p in pairs] == [
    (("pvtv2", "b2"), ("pvtv2", "b0"), "pvtv2-b2_to_pvtv2-b0"),
    (("segformer", "b2"), ("lvt", "lvt"), "segformer-b2_to_lvt"),
    (("pvtv2", "b2"), ("lvt", "lvt"), "pvtv2-b2_to_lvt"),
  ]
  assert pairs[1].title == "SegFormer-B2 -> LVT"
  runs = recipe.run_configs(config, pairs[0])
  assert list(runs) == ["teacher", "student", "transkd_base"]  # pair_methods
  assert runs["teacher"].total_steps == 5 and runs["student"].total_steps == 3
  assert (
    runs["transkd_base"].teacher.arch,
    runs["transkd_base"].teacher.variant,
    runs["transkd_base"].student.arch,
  ) == ("pvtv2", "b2", "pvtv2")
  # The config's own pair, listed, keeps the top-level directories and its own budget.
  config.recipe.pairs = ("pvtv2-b2>lvt",)
  config.teacher.arch, config.student.arch = "pvtv2", "lvt"
  from runs import set_variant

  set_variant(config, "teacher", "b2")
  set_variant(config, "student", "lvt")
  (own,) = recipe.pairs_of(config)
  assert own.subdir == "" and list(recipe.run_configs(config, own)) == [
    "teacher",
    "student",
    "transkd_base",
    "kd",
  ]


@pytest.mark.parametrize(
  "entry,message",
  [
    ("pvtv2-b2", "expected 'TEACHER>STUDENT'"),
    ("pvtv2-b9>pvtv2-b0", "'pvtv2-b9' is not a model"),
    ("resnet-50>lvt", "Unknown architecture 'resnet'"),
  ],
)
def test_a_bad_pair_is_named(tmp_path, entry, message):
  from transkd_jax.config import validate_config

  config = _config(tmp_path)
  config.recipe.pairs = (entry,)
  with pytest.raises(UserError, match=f"config.recipe.pairs entry '{entry}'.*{message}"):
    validate_config(config)


def test_each_pair_gets_its_directory_its_section_and_shares_a_trained_teacher(
  tmp_path, monkeypatch
):
  """The orchestration alone (training and evaluation replaced by a record of the calls)."""
  calls = []

  def fake_run(name, run_config, workdir):
    calls.append(
      (
        name,
        workdir,
        run_config.teacher.arch,
        run_config.student.arch,
        run_config.teacher.checkpoint,
        run_config.total_steps,
      )
    )
    return {
      "train_time_s": 1.0,
      "steps": run_config.total_steps,
      "eval": {"miou": 0.1 * len(calls), "protocol": "standard", "num_images": 4},
    }

  monkeypatch.setattr(recipe, "run_one", fake_run)
  monkeypatch.setattr(
    recipe, "_given_teacher", lambda config, workdir: fake_run("given", config, workdir)
  )
  monkeypatch.setattr(
    recipe,
    "model_rows",
    lambda config, source: {
      role: {"model": f"{config[role].arch}", "params": 1e6, "gflops": 1.0, "source": source}
      for role in ("teacher", "student")
    },
  )
  config = _pairs_config(tmp_path)
  out = recipe.run_recipe(config, str(tmp_path / "r"))
  root = tmp_path / "r"
  trained = [(n, w) for n, w, *_ in calls]
  assert trained == [
    ("pvtv2-b2_to_pvtv2-b0/teacher", str(root / "pvtv2-b2_to_pvtv2-b0" / "teacher")),
    ("pvtv2-b2_to_pvtv2-b0/student", str(root / "pvtv2-b2_to_pvtv2-b0" / "student")),
    ("pvtv2-b2_to_pvtv2-b0/transkd_base", str(root / "pvtv2-b2_to_pvtv2-b0" / "transkd_base")),
    ("segformer-b2_to_lvt/teacher", str(root / "segformer-b2_to_lvt" / "teacher")),
    ("segformer-b2_to_lvt/student", str(root / "segformer-b2_to_lvt" / "student")),
    ("segformer-b2_to_lvt/transkd_base", str(root / "segformer-b2_to_lvt" / "transkd_base")),
    ("pvtv2-b2_to_lvt/student", str(root / "pvtv2-b2_to_lvt" / "student")),
    ("pvtv2-b2_to_lvt/transkd_base", str(root / "pvtv2-b2_to_lvt" / "transkd_base")),
    # The third pair's teacher is the first pair's: evaluated for its row, not trained.
    ("given", str(root / "pvtv2-b2_to_lvt")),
  ]
  shared = str(root / "pvtv2-b2_to_pvtv2-b0" / "teacher")
  assert calls[-2][4] == calls[-1][4] == shared and calls[-2][2:4] == ("pvtv2", "lvt")
  assert [c[5] for c in calls if c[0].endswith("/teacher")] == [5, 5]
  table = (root / "results.md").read_text()
  assert [line for line in table.splitlines() if line.startswith("## ")] == [
    "## PVTv2-B2 -> PVTv2-B0",
    "## SegFormer-B2 -> LVT",
    "## PVTv2-B2 -> LVT",
  ]
  assert table.count("| transkd_base |") == 3
  saved = json.loads((root / "results.json").read_text())
  assert (
    list(saved["pairs"])
    == list(out["pairs"])
    == ["PVTv2-B2 -> PVTv2-B0", "SegFormer-B2 -> LVT", "PVTv2-B2 -> LVT"]
  )
  assert saved["pairs"]["SegFormer-B2 -> LVT"]["dir"] == "segformer-b2_to_lvt"
