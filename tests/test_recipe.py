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
  assert (tmp_path / "recipe" / "results_curve.png").exists()  # no points: eval_every=0
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


def _fake_model_rows(config, source):
  """model_rows without building the models: 1 M parameters, 1 GFLOP, named by role."""
  return {
    role: {"model": role, "params": 1e6, "gflops": 1.0, "source": source}
    for role in ("teacher", "student")
  }


def test_seeds_give_each_method_a_mean_a_std_a_curve_and_steps_to_the_students_accuracy(
  tmp_path, monkeypatch
):
  """Orchestration and arithmetic with the runs replaced: numbers checked by hand."""
  miou = {  # (method, seed) -> final mIoU
    ("student", 0): 0.30,
    ("student", 1): 0.32,
    ("student", 2): 0.34,
    ("transkd_base", 0): 0.33,
    ("transkd_base", 1): 0.35,
    ("transkd_base", 2): 0.37,
    ("kd", 0): 0.20,
    ("kd", 1): 0.20,
    ("kd", 2): 0.20,
  }
  curves = {  # the in-training validations (mIoU %) at steps 2 and 4
    "student": [[2, 20.0], [4, 29.0]],
    "student-seed1": [[2, 22.0], [4, 30.0]],
    "student-seed2": [[2, 24.0], [4, 31.0]],  # mean: 22 then 30, the target
    "transkd_base": [[2, 31.0], [4, 35.0]],  # above 30 at step 2 already
    "kd": [[2, 10.0], [4, 20.0]],  # never
  }
  seen = []

  def fake_run(name, run_config, workdir):
    seen.append((name, run_config.method, run_config.seed))
    key = (run_config.method, run_config.seed)
    return {
      "train_time_s": 60.0,
      "steps": run_config.total_steps,
      "eval": {"miou": miou.get(key, 0.5), "protocol": "standard", "num_images": 4},
    }

  monkeypatch.setattr(recipe, "run_one", fake_run)
  monkeypatch.setattr(
    recipe,
    "val_curve",
    lambda workdir: curves.get(name := workdir.rsplit("/", 1)[-1], curves.get(name[:-6], [])),
  )
  monkeypatch.setattr(recipe, "model_rows", _fake_model_rows)
  config = _config(tmp_path, methods=("student", "transkd_base", "kd"))
  config.total_steps, config.recipe.seeds, config.seed = 4, 3, 0
  out = recipe.run_recipe(config, str(tmp_path / "r"))
  assert seen[:4] == [
    ("teacher", "teacher", 0),
    ("student", "student", 0),
    ("student-seed1", "student", 1),
    ("student-seed2", "student", 2),
  ]
  assert len(seen) == 10  # one teacher for all seeds
  methods = out["methods"]
  assert methods["student"]["miou"] == pytest.approx(32.0)
  assert methods["student"]["miou_std"] == pytest.approx(2.0)
  assert methods["student"]["curve"] == [[2, pytest.approx(22.0)], [4, pytest.approx(30.0)]]
  assert (methods["student"]["steps_to_student"], methods["transkd_base"]["steps_to_student"]) == (
    4,
    2,
  )
  assert methods["transkd_base"]["fraction_of_student"] == 0.5
  assert methods["kd"]["steps_to_student"] is None
  assert "steps_to_student" not in methods["teacher"]
  table = (tmp_path / "r" / "results.md").read_text()
  assert "| transkd_base | student | 1.00 M | 1.00 | 35.00 ± 2.00 | +3.00 | 3 | 4 | 2 (0.50) |" in (
    table
  )
  assert "| kd | student | 1.00 M | 1.00 | 20.00 ± 0.00 | -12.00 | 3 | 4 | not reached |" in table
  assert "mean ± std (n - 1) over seeds 0-2" in table
  assert Image.open(tmp_path / "r" / "results_curve.png").size == (760, 440)
  saved = json.loads((tmp_path / "r" / "results.json").read_text())
  assert saved["methods"]["transkd_base"]["miou_per_seed"] == pytest.approx([33.0, 35.0, 37.0])


def test_the_ablation_adds_its_rows_and_says_which_gains_are_beyond_the_noise(
  tmp_path, monkeypatch
):
  miou = {  # method -> the two seeds' mIoU (%): means 30, 33, 33.1, 34, 34, 34, 34
    "student": (29.0, 31.0),  # std 1.414
    "hcl": (32.0, 34.0),  # +3 over student; standard error sqrt(2/2 + 2/2) = 1.414: 2.1 x
    "csf": (33.0, 33.2),  # +0.1 over hcl: no
    "transkd_base": (34.0, 34.0),
    "transkd_gl": (34.0, 34.0),  # +0, standard error 0: no
    "transkd_ea": (34.0, 34.0),
    "reviewkd": (34.0, 34.0),
    "teacher": (50.0,),
  }
  seen = []

  def fake_run(name, run_config, workdir):
    seen.append(name)
    value = miou[run_config.method][run_config.seed % len(miou[run_config.method])]
    return {
      "train_time_s": 1.0,
      "steps": run_config.total_steps,
      "eval": {"miou": value / 100, "protocol": "standard", "num_images": 4},
    }

  monkeypatch.setattr(recipe, "run_one", fake_run)
  monkeypatch.setattr(recipe, "model_rows", _fake_model_rows)
  config = _config(tmp_path, methods=("student", "transkd_base"))
  config.recipe.seeds, config.recipe.ablation = 2, True
  out = recipe.run_recipe(config, str(tmp_path / "r"))
  assert seen == [
    "teacher",
    *(f"{m}{s}" for m in ("student", "transkd_base") for s in ("", "-seed1")),
    *(
      f"{m}{s}"
      for m in ("hcl", "csf", "transkd_gl", "transkd_ea", "reviewkd")
      for s in ("", "-seed1")
    ),
  ]
  table = (tmp_path / "r" / "results.md").read_text()
  main, ablation = table.split("## Ablation")
  assert "| hcl |" not in main and "| transkd_base |" in main  # recipe.methods only
  rows = {r["method"]: r for r in out["ablation"]}
  assert list(rows) == [
    "student",
    "hcl",
    "csf",
    "transkd_base",
    "transkd_gl",
    "transkd_ea",
    "reviewkd",
  ]
  assert rows["hcl"]["gain"] == pytest.approx(3.0) and rows["hcl"]["beyond_noise"] is True
  assert rows["hcl"]["standard_error"] == pytest.approx(2**0.5)
  assert rows["csf"]["gain"] == pytest.approx(0.1) and rows["csf"]["beyond_noise"] is False
  assert (
    rows["transkd_gl"]["compared_with"] == "transkd_base" and not rows["transkd_gl"]["beyond_noise"]
  )
  assert (
    "| + HCL on the stage maps (1x1 adapters, no CSF) | hcl | 33.00 ± 1.41 | +3.00 | student "
    "| yes: 2.1 x its standard error (1.41) | yes: +3.00, infinitely many times its standard "
    "error (0.00) |" in ablation
  )
  # Paired by seed: hcl - student is +3 on both seeds; csf - hcl is +1.0 and -0.8.
  assert rows["hcl"]["paired_beyond_noise"] is True
  assert rows["csf"]["paired_gain"] == pytest.approx(0.1)
  assert rows["csf"]["paired_standard_error"] == pytest.approx(0.9)
  assert rows["csf"]["paired_beyond_noise"] is False
  assert json.loads((tmp_path / "r" / "results.json").read_text())["ablation"][1]["method"] == "hcl"
