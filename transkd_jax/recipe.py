"""The paper's table in miniature: a teacher, the student alone, and the student
distilled by every method, with one seed; one command.

    python -m transkd_jax.main --mode=recipe --config=configs/synthetic.py --workdir=DIR

1. ``DIR/teacher``: trains SegFormer-``config.teacher.variant`` for
   ``config.recipe.teacher_steps`` (``--config.method=teacher``), unless
   ``config.teacher.checkpoint`` names a teacher already trained or converted.
2. ``DIR/<method>`` for each of ``config.recipe.methods``: trains the student
   for ``config.total_steps`` with the same seed, distilling from that teacher.
   The student-alone row takes ``config.recipe.student_batch_size`` /
   ``student_steps`` / ``student_decay_steps`` when set (the public
   train_student.py's budget, which configs/cityscapes.py and acdc.py set:
   override those keys too when you shorten a run).
3. Evaluates each run's best checkpoint (``--mode=eval``: validation mIoU) and
   writes ``DIR/results.md`` (method, params, GFLOPs, mIoU with its protocol,
   train time), ``DIR/results.json`` and ``DIR/results.png`` (mIoU bars).

``config.recipe.pairs`` runs the table for several teacher/student pairs, e.g.
``("segformer-b2>segformer-b0", "pvtv2-b2>pvtv2-b0", "segformer-b2>lvt")``: the
config's own pair (``config.teacher`` / ``config.student``) keeps ``DIR/teacher``
and ``DIR/<method>``; every other pair gets ``DIR/<teacher>_to_<student>/``, runs
``config.recipe.pair_methods`` (empty: ``config.recipe.methods``) for
``config.recipe.pair_steps`` steps (0: ``config.total_steps``), and a teacher trained
for ``config.recipe.pair_teacher_steps`` (0: as the own pair's) unless a pair before
it trained the same teacher. ``results.md`` gets a section per pair.

Every run is an ordinary workdir (resume it, evaluate it, predict with it on
its own). A run is finished when its ``eval_results.json`` exists; invoking the
recipe again skips finished runs and resumes unfinished ones from their last
checkpoint. ``--config.x=y`` overrides apply to every run (``recipe.student_*``
take precedence for the student-alone row).
"""

import copy
import time
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath
from PIL import Image, ImageDraw

from transkd_jax import storage
from transkd_jax.distill import get_method
from transkd_jax.errors import UserError
from transkd_jax.evaluate import run_eval
from transkd_jax.info import model_info
from transkd_jax.models import archs
from transkd_jax.pairs import Pair, pairs_of
from transkd_jax.train import train

RUN_FILE = "recipe_run.json"  # per run: training time, steps, status
BASELINE = "student"  # the run every other student run is compared with


def _with_models(config, pair: Pair):
  """``config`` with the pair's teacher and student, and the pair's budget."""
  run = copy.deepcopy(config)
  with run.unlocked():
    for role, (arch, variant) in (("teacher", pair.teacher), ("student", pair.student)):
      if (run[role].arch, str(run[role].variant)) != (arch, variant):
        # A new dict: variant may be a row (tests) where the pair names a string.
        run[role] = ml_collections.ConfigDict(
          {**run[role].to_dict(), "arch": arch, "variant": variant, "init": ""}
        )
    if pair.subdir:
      run.total_steps = int(config.recipe.pair_steps or config.total_steps)
      run.recipe.methods = tuple(config.recipe.pair_methods or config.recipe.methods)
      run.recipe.teacher_steps = int(
        config.recipe.pair_teacher_steps or config.recipe.teacher_steps
      )
      run.teacher.checkpoint = ""
  return run


def run_configs(config, pair: Optional[Pair] = None) -> dict:
  """{run name: config} of one pair (default: the config's own), the teacher first
  (left out when the config gives one)."""
  if pair is not None:
    config = _with_models(config, pair)
  runs = {}
  if not config.teacher.checkpoint:
    teacher = copy.deepcopy(config)
    with teacher.unlocked():
      teacher.method = "teacher"
      teacher.total_steps = int(config.recipe.teacher_steps or config.total_steps)
    runs["teacher"] = teacher
  for method in config.recipe.methods:
    try:
      get_method(method)
    except ValueError as e:
      raise UserError(f"config.recipe.methods: {e}") from None
    run = copy.deepcopy(config)
    with run.unlocked():
      run.method = method
      if method == BASELINE:  # the student alone, on its own budget when one is set
        recipe = config.recipe
        if recipe.student_batch_size:  # global, as the public solo scripts' batch
          run.batch_size, run.per_device_batch_size = recipe.student_batch_size, 0
        run.total_steps = recipe.student_steps or run.total_steps
        run.optimizer.decay_steps = recipe.student_decay_steps or run.optimizer.decay_steps
    runs[method] = run
  return runs


def _read_json(path):
  return storage.read_json(path)


def run_one(name: str, config, workdir: str) -> dict:
  """Trains (or resumes) and evaluates one run; a finished run is only read."""
  results = _read_json(storage.join(workdir, "eval_results.json"))
  record = _read_json(storage.join(workdir, RUN_FILE)) or {"train_time_s": 0.0}
  if results is not None and record.get("status") == "done":
    print(
      f"[{name}] finished earlier: mIoU {100 * results['miou']:.2f} "
      f"({results['protocol']} protocol); skipped",
      flush=True,
    )
    return {**record, "eval": results}
  print(
    f"[{name}] training {config.total_steps} steps (method {config.method}) in {workdir}",
    flush=True,
  )
  start = time.perf_counter()
  summary = train(config, workdir)
  record["train_time_s"] += time.perf_counter() - start
  record.update(status=summary["status"], steps=summary["step"])
  _write_json(storage.join(workdir, RUN_FILE), record)
  if summary["status"] != "done":
    raise UserError(
      f"[{name}] stopped at step {summary['step']} ({summary['status']}); run "
      "the recipe again to resume it"
    )
  results = run_eval(config, workdir)
  return {**record, "eval": results}


def _write_json(path, value):
  if jax.process_index() == 0:
    storage.write_json(path, value, indent=2)


def model_rows(config, teacher_source: str) -> dict:
  """Params and GFLOPs of the deployed teacher and student at config.image_size."""
  size = tuple(config.image_size)
  rows = {}
  for role in ("teacher", "student"):
    arch, variant = config[role].arch, config[role].variant
    model = archs.build(arch, variant, config.num_classes, dtype=jnp.float32)
    rows[role] = {"model": archs.model_name(arch, variant), **model_info(model, size)}
  rows["teacher"]["source"] = teacher_source
  return rows


def results_table(config, runs: dict, models: dict) -> str:
  """The markdown table of DIR/results.md."""
  protocol = next(iter(runs.values()))["eval"]["protocol"]
  baseline = runs.get(BASELINE)
  header = (
    "| method | model | params | GFLOPs | mIoU (%) | vs student | steps | train time |\n"
    "|---|---|---|---|---|---|---|---|"
  )
  lines = [header]
  for name, run in runs.items():
    role = get_method(name).trains
    miou = 100 * run["eval"]["miou"]
    compared = baseline is not None and name != BASELINE and role == get_method(BASELINE).trains
    delta = f"{miou - 100 * baseline['eval']['miou']:+.2f}" if compared else ""
    time_s = run.get("train_time_s")
    lines.append(
      f"| {name} | {models[role]['model']} | {models[role]['params'] / 1e6:.2f} M | "
      f"{models[role]['gflops']:.2f} | {miou:.2f} | {delta} | "
      f"{run.get('steps') or ''} | "
      f"{'given' if time_s is None else f'{time_s / 60:.1f} min'} |"
    )
  size = "x".join(str(s) for s in config.image_size)
  notes = [
    f"mIoU: `{protocol}` protocol, {config.data.name} `{config.eval_split}` "
    f"split ({runs[next(iter(runs))]['eval']['num_images']} images), each run's best "
    "checkpoint by validation mIoU.",
    f"Students: {config.total_steps} steps each, batch {config.batch_size}, {size} inputs, "
    f"seed {config.seed}; the teacher: {models['teacher']['source']}.",
    "Params and GFLOPs (XLA's count: about 2 x multiply-adds, one image at "
    f"{size}) are the deployed model's; training-time modules are dropped after training.",
  ]
  recipe = config.recipe
  if BASELINE in runs and (recipe.student_batch_size or recipe.student_steps):
    notes.append(
      f"The student-alone row has its own budget, as the public train_student.py: "
      f"batch {recipe.student_batch_size or config.batch_size}, "
      f"{recipe.student_steps or config.total_steps} steps."
    )
  return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def bar_chart(path: str, runs: dict, protocol: str):
  """DIR/results.png: one bar of mIoU per run (PIL only; no plotting library needed)."""
  names = list(runs)
  values = [100 * runs[n]["eval"]["miou"] for n in names]
  width, height, left, bottom, top = 120 + 90 * len(names), 420, 60, 60, 40
  image = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(image)
  top_value = max(max(values), 1e-6) * 1.15
  scale = (height - bottom - top) / top_value
  draw.text((left, 10), f"mIoU (%), {protocol} protocol", fill="black")
  draw.line((left, height - bottom, width - 20, height - bottom), fill="black")
  for i, (name, value) in enumerate(zip(names, values)):
    x0 = left + 20 + 90 * i
    y0 = height - bottom - value * scale
    colour = (
      (120, 120, 120)
      if get_method(name).trains != get_method(BASELINE).trains
      else ((200, 90, 60) if name == BASELINE else (60, 110, 190))
    )
    draw.rectangle((x0, y0, x0 + 60, height - bottom), fill=colour)
    draw.text((x0 + 8, y0 - 14), f"{value:.1f}", fill="black")
    draw.text((x0, height - bottom + 8), name[:12], fill="black")
  with epath.Path(path).open("wb") as f:  # a local file or a gs:// object
    image.save(f, format="PNG")


def _run_pair(config, pair: Pair, workdir: str, teachers: dict) -> dict:
  """Runs one pair's table in ``workdir``; ``teachers`` maps a teacher model to the
  directory of the teacher this recipe trained for it (shared by later pairs)."""
  config = _with_models(config, pair)
  if pair.teacher in teachers and not config.teacher.checkpoint:
    with config.unlocked():
      config.teacher.checkpoint = teachers[pair.teacher]
  configs = run_configs(config)
  teacher_source = config.teacher.checkpoint or storage.join(workdir, "teacher")
  runs = {}
  for name, run_config in configs.items():
    run_dir = storage.join(workdir, name)
    if get_method(run_config.method).teacher_call:
      with run_config.unlocked():
        run_config.teacher.checkpoint = teacher_source
    label = f"{pair.subdir}/{name}" if pair.subdir else name
    runs[name] = run_one(label, run_config, run_dir)
  if "teacher" not in runs:  # a given teacher: evaluate it for its row
    runs = {"teacher": _given_teacher(config, workdir), **runs}
  if "teacher" in configs:
    teachers[pair.teacher] = teacher_source
    source = f"trained by this recipe for {configs['teacher'].total_steps} steps"
  elif pair.teacher in teachers and config.teacher.checkpoint == teachers[pair.teacher]:
    source = f"trained by this recipe, shared with an earlier pair ({teacher_source})"
  else:
    source = f"given ({config.teacher.checkpoint})"
  models = model_rows(config, source)
  return {
    "runs": runs,
    "models": models,
    "table": results_table(config, runs, models),
    "protocol": runs["teacher"]["eval"]["protocol"],
  }


def run_recipe(config, workdir: str) -> dict:
  """Runs (or resumes) every run of the recipe and writes the results; returns them.

  Returns (and writes to results.json) the config's own pair's "runs" and
  "models" at the top level, and every pair under "pairs" by title.
  """
  storage.makedirs(workdir)
  pairs = pairs_of(config)
  wall = time.perf_counter()
  teachers, results = {}, {}
  for pair in pairs:
    if len(pairs) > 1:
      print(
        f"== pair {pair.title} ({storage.join(workdir, pair.subdir) if pair.subdir else workdir})",
        flush=True,
      )
    results[pair] = _run_pair(
      config, pair, storage.join(workdir, pair.subdir) if pair.subdir else workdir, teachers
    )
  if len(pairs) == 1:
    table = results[pairs[0]]["table"]
  else:
    table = "\n".join(f"## {pair.title}\n\n{results[pair]['table']}" for pair in pairs)
  first = results[next((p for p in pairs if not p.subdir), pairs[0])]
  if _is_chief():
    storage.write_text(storage.join(workdir, "results.md"), table)
    bar_chart(storage.join(workdir, "results.png"), first["runs"], first["protocol"])
  summary = {
    "runs": first["runs"],
    "models": first["models"],
    "pairs": {
      pair.title: {
        "dir": pair.subdir,
        "runs": results[pair]["runs"],
        "models": results[pair]["models"],
      }
      for pair in pairs
    },
  }
  _write_json(
    storage.join(workdir, "results.json"), {**summary, "wall_time_s": time.perf_counter() - wall}
  )
  print("\n" + table, flush=True)
  print(
    f"wrote {storage.join(workdir, 'results.md')}, results.json and results.png "
    f"({(time.perf_counter() - wall) / 60:.1f} min in all)",
    flush=True,
  )
  return summary


def _is_chief():
  return jax.process_index() == 0


def _given_teacher(config, workdir: str) -> dict:
  """Evaluates config.teacher.checkpoint (once) for the table's teacher row."""
  run_dir = storage.join(workdir, "teacher_given")
  storage.makedirs(run_dir)
  results = _read_json(storage.join(run_dir, "eval_results.json"))
  if results is None:
    teacher = copy.deepcopy(config)
    with teacher.unlocked():
      teacher.method = "teacher"
      teacher.eval.checkpoint = config.teacher.checkpoint
      teacher.eval.input_norm = config.teacher.input_norm  # else what it records
    results = run_eval(teacher, run_dir)
  return {"train_time_s": None, "eval": results}
