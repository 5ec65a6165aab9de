"""The paper's table in miniature: a teacher, the student alone, and the student
distilled by every method, over ``config.recipe.seeds`` seeds; one command.

    python -m transkd_jax.main --mode=recipe --config=configs/synthetic.py --workdir=DIR

1. ``DIR/teacher``: trains SegFormer-``config.teacher.variant`` for
   ``config.recipe.teacher_steps`` (``--config.method=teacher``), unless
   ``config.teacher.checkpoint`` names a teacher already trained or converted.
2. ``DIR/<method>`` for each of ``config.recipe.methods``: trains the student
   for ``config.total_steps`` with ``config.seed``, distilling from that teacher;
   with ``config.recipe.seeds`` = n > 1 also ``DIR/<method>-seed<s>`` for the
   seeds ``config.seed + 1 .. + n - 1`` (one teacher for all of them).
   The student-alone row takes ``config.recipe.student_batch_size`` /
   ``student_steps`` / ``student_decay_steps`` when set (the public
   train_student.py's budget, which configs/cityscapes.py and acdc.py set:
   override those keys too when you shorten a run).
3. Evaluates each run's best checkpoint (``--mode=eval``: validation mIoU) and
   writes ``DIR/results.md`` (per method: params, GFLOPs, mIoU as mean +- std over
   the seeds with its protocol, steps to the student's accuracy, train time),
   ``DIR/results.json``, ``DIR/results.png`` (mIoU bars) and
   ``DIR/results_curve.png`` (each method's validation mIoU over steps, the mean
   over seeds, from the runs' ``metrics.jsonl``: ``config.eval_every`` sets the
   points).

Steps to the student's accuracy is the paper's training-time claim in miniature:
the first evaluated step at which a method's mean validation mIoU reaches the
student alone's final one (its mean at the last step), and that step as a
fraction of the student alone's steps.

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
import functools
import time
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from PIL import Image, ImageDraw

from transkd_jax import storage
from transkd_jax.distill import get_method
from transkd_jax.errors import UserError
from transkd_jax.evaluate import run_eval
from transkd_jax.info import model_info
from transkd_jax.logs import read_metrics
from transkd_jax.models import archs
from transkd_jax.pairs import Pair, pairs_of
from transkd_jax.train import train

RUN_FILE = "recipe_run.json"  # per run: training time, steps, status
BASELINE = "student"  # the run every other student run is compared with
# config.recipe.ablation: (method, the row it is compared with, what it adds), in order.
ABLATION = (
  ("student", None, "the student alone"),
  ("hcl", "student", "+ HCL on the stage maps (1x1 adapters, no CSF)"),
  ("csf", "hcl", "+ CSF before HCL"),
  ("transkd_base", "csf", "+ PEA (= TransKD-Base)"),
  ("transkd_gl", "transkd_base", "+ GL-Mixer on stage 4 (TransKD-GL)"),
  ("transkd_ea", "transkd_base", "+ Embedding Assistant (TransKD-EA)"),
  ("reviewkd", "transkd_base", "ReviewKD (ABF + HCL), beside TransKD-Base"),
)


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
      run.recipe.ablation = False  # the config's own pair only
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
  methods = tuple(config.recipe.methods)
  if config.recipe.ablation:
    methods += tuple(m for m, _, _ in ABLATION if m not in methods)
  for method in methods:
    try:
      get_method(method)
    except ValueError as e:
      raise UserError(f"config.recipe.methods: {e}") from None
    for index in range(int(config.recipe.seeds)):
      run = copy.deepcopy(config)
      with run.unlocked():
        run.method = method
        run.seed = config.seed + index
        if method == BASELINE:  # the student alone, on its own budget when one is set
          recipe = config.recipe
          if recipe.student_batch_size:  # global, as the public solo scripts' batch
            run.batch_size, run.per_device_batch_size = recipe.student_batch_size, 0
          run.total_steps = recipe.student_steps or run.total_steps
          run.optimizer.decay_steps = recipe.student_decay_steps or run.optimizer.decay_steps
      runs[method if index == 0 else f"{method}-seed{run.seed}"] = run
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


@functools.lru_cache(maxsize=None)
def _model_row(arch: str, variant, num_classes: int, size: tuple) -> dict:
  """One deployed model's name, params and GFLOPs (a trace; cached: a pair's teacher
  is often another pair's, and a second invocation asks again)."""
  model = archs.build(arch, variant, num_classes, dtype=jnp.float32)
  return {"model": archs.model_name(arch, variant), **model_info(model, size)}


def model_rows(config, teacher_source: str) -> dict:
  """Params and GFLOPs of the deployed teacher and student at config.image_size."""
  size = tuple(config.image_size)
  rows = {
    role: dict(_model_row(config[role].arch, config[role].variant, config.num_classes, size))
    for role in ("teacher", "student")
  }
  rows["teacher"]["source"] = teacher_source
  return rows


def val_curve(workdir: str) -> list:
  """[[step, mIoU %], ...] of a run's in-training validations (its metrics.jsonl);
  a step evaluated twice (a resumed run) keeps its last value."""
  points = {
    row["step"]: 100 * row["miou"] for row in read_metrics(workdir) if row["split"] == "val"
  }
  return [[step, points[step]] for step in sorted(points)]


def _mean_curve(curves: list) -> list:
  """The mean over seeds at the steps every seed evaluated."""
  shared = set.intersection(*(set(step for step, _ in c) for c in curves)) if curves else set()
  return [
    [step, float(np.mean([dict(map(tuple, c))[step] for c in curves]))] for step in sorted(shared)
  ]


def by_method(runs: dict) -> dict:
  """{method: summary over its seeds}: mIoU (%) mean, std (ddof=1; 0 for one seed) and
  per seed, the mean train time and validation curve, and steps to the student's
  accuracy (``steps_to_student``: the first step of the mean curve at or above the
  student alone's final value; ``fraction_of_student``: that over its steps)."""
  groups = {}
  for run in runs.values():
    groups.setdefault(run["method"], []).append(run)
  methods = {}
  for method, group in groups.items():
    mious = [100 * run["eval"]["miou"] for run in group]
    times = [run["train_time_s"] for run in group if run.get("train_time_s") is not None]
    methods[method] = {
      "seeds": [run.get("seed") for run in group],
      "miou": float(np.mean(mious)),
      "miou_std": float(np.std(mious, ddof=1)) if len(mious) > 1 else 0.0,
      "miou_per_seed": mious,
      "steps": group[0].get("steps"),
      "train_time_s": float(np.mean(times)) if times else None,
      "curve": _mean_curve([run.get("curve") or [] for run in group]),
    }
  baseline = methods.get(BASELINE)
  if baseline and baseline["curve"] and baseline["steps"]:
    target = baseline["curve"][-1][1]
    for method, row in methods.items():
      if get_method(method).trains != get_method(BASELINE).trains:
        continue
      step = next((s for s, miou in row["curve"] if miou >= target), None)
      row["steps_to_student"] = step
      row["fraction_of_student"] = None if step is None else step / baseline["steps"]
  return methods


def results_table(config, methods: dict, models: dict, protocol: str, num_images: int) -> str:
  """The markdown table of DIR/results.md: one row per method, mean +- std over seeds."""
  baseline = methods.get(BASELINE)
  header = (
    "| method | model | params | GFLOPs | mIoU (%) | vs student | seeds | steps "
    "| steps to student | train time |\n|---|---|---|---|---|---|---|---|---|---|"
  )
  lines = [header]
  for name, row in methods.items():
    role = get_method(name).trains
    compared = baseline is not None and name != BASELINE and role == get_method(BASELINE).trains
    delta = f"{row['miou'] - baseline['miou']:+.2f}" if compared else ""
    miou = f"{row['miou']:.2f}" + (f" ± {row['miou_std']:.2f}" if len(row["seeds"]) > 1 else "")
    if "steps_to_student" not in row:
      reached = ""
    elif row["steps_to_student"] is None:
      reached = "not reached"
    else:
      reached = f"{row['steps_to_student']} ({row['fraction_of_student']:.2f})"
    time_s = row["train_time_s"]
    lines.append(
      f"| {name} | {models[role]['model']} | {models[role]['params'] / 1e6:.2f} M | "
      f"{models[role]['gflops']:.2f} | {miou} | {delta} | {len(row['seeds'])} | "
      f"{row['steps'] or ''} | {reached} | "
      f"{'given' if time_s is None else f'{time_s / 60:.1f} min'} |"
    )
  size = "x".join(str(s) for s in config.image_size)
  seeds = int(config.recipe.seeds)
  notes = [
    f"mIoU: `{protocol}` protocol, {config.data.name} `{config.eval_split}` "
    f"split ({num_images} images), each run's best checkpoint by validation mIoU"
    + (
      f"; mean ± std (n - 1) over seeds {config.seed}-{config.seed + seeds - 1}."
      if seeds > 1
      else "."
    ),
    f"Students: {config.total_steps} steps each, batch {config.batch_size}, {size} inputs, "
    f"`{config.data.transforms}` transforms, seed {config.seed}"
    + (f" and the {seeds - 1} after it" if seeds > 1 else "")
    + f"; the teacher: {models['teacher']['source']}.",
    "Steps to student: the first validated step "
    f"({f'every {config.eval_every} steps' if config.eval_every else 'the final one only'}) "
    "at which the method's mean validation mIoU "
    "reaches the student alone's final one, and that step as a fraction of the student's "
    "steps (the paper's training-time claim in miniature); train time is per run.",
    "Params and GFLOPs (XLA's count: about 2 x multiply-adds, one image at "
    f"{size}) are the deployed model's; training-time modules are dropped after training.",
  ]
  recipe = config.recipe
  if BASELINE in methods and (recipe.student_batch_size or recipe.student_steps):
    notes.append(
      f"The student-alone row has its own budget, as the public train_student.py: "
      f"batch {recipe.student_batch_size or config.batch_size}, "
      f"{recipe.student_steps or config.total_steps} steps."
    )
  return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def _paired(row: dict, other: dict) -> dict:
  """The gain of ``row`` over ``other`` paired by seed: a seed fixes the initialisation
  and the data order of every method's run, so the per-seed differences cancel what the
  seed does to both. Their mean, its standard error std(d) / sqrt(n), and whether the mean
  is beyond twice that; None where fewer than two seeds are shared."""
  mine = dict(zip(row["seeds"], row["miou_per_seed"]))
  theirs = dict(zip(other["seeds"], other["miou_per_seed"]))
  diffs = [mine[s] - theirs[s] for s in mine if s in theirs]
  if len(diffs) < 2:
    return {"paired_gain": None, "paired_standard_error": None, "paired_beyond_noise": None}
  error = float(np.std(diffs, ddof=1) / np.sqrt(len(diffs)))
  gain = float(np.mean(diffs))
  return {
    "paired_gain": gain,
    "paired_standard_error": error,
    "paired_beyond_noise": bool(abs(gain) > 2 * error),
  }


def ablation_rows(methods: dict) -> list:
  """ABLATION's rows with each one's gain over the row it is compared with, and whether
  that gain is beyond the seed noise: more than twice its standard error,
  sqrt(std_a^2 / n_a + std_b^2 / n_b), which needs two seeds or more on both sides; and
  the same gain paired by seed (``_paired``)."""
  rows = []
  for method, base, adds in ABLATION:
    row = methods[method]
    entry = {"method": method, "adds": adds, "compared_with": base, "miou": row["miou"]}
    entry.update(miou_std=row["miou_std"], seeds=len(row["seeds"]))
    if base is not None:
      other = methods[base]
      gain = row["miou"] - other["miou"]
      error = (
        row["miou_std"] ** 2 / len(row["seeds"]) + other["miou_std"] ** 2 / len(other["seeds"])
      ) ** 0.5
      noisy = min(len(row["seeds"]), len(other["seeds"])) < 2
      entry.update(gain=gain, standard_error=None if noisy else error)
      entry["beyond_noise"] = None if noisy else bool(abs(gain) > 2 * error)
      entry.update(_paired(row, other))
    rows.append(entry)
  return rows


def ablation_table(rows: list) -> str:
  """The markdown of results.md's ablation section."""
  lines = [
    "| what | method | mIoU (%) | gain | over | beyond the seed noise? | paired by seed |",
    "|---|---|---|---|---|---|---|",
  ]
  for row in rows:
    miou = f"{row['miou']:.2f}" + (f" ± {row['miou_std']:.2f}" if row["seeds"] > 1 else "")
    if row["compared_with"] is None:
      gain = verdict = paired = ""
    else:
      gain = f"{row['gain']:+.2f}"
      verdict = _verdict(row["gain"], row["standard_error"], row["beyond_noise"])
      paired = _verdict(
        row["paired_gain"], row["paired_standard_error"], row["paired_beyond_noise"], True
      )
    lines.append(
      f"| {row['adds']} | {row['method']} | {miou} | {gain} | {row['compared_with'] or ''} "
      f"| {verdict} | {paired} |"
    )
  return (
    "\n".join(lines)
    + "\n\n- Each row's gain is over the row named in 'over'; beyond the seed noise means "
    "more than twice the gain's standard error, sqrt(std_a^2 / n_a + std_b^2 / n_b).\n"
    "- Paired by seed: the mean of the per-seed differences (a seed fixes the initialisation "
    "and the data order of every method's run) against twice its standard error, "
    "std(d) / sqrt(n).\n"
  )


def _verdict(gain, error, beyond, with_gain: bool = False) -> str:
  if beyond is None:
    return "one seed: no estimate"
  ratio = f"{abs(gain) / error:.1f} x" if error > 1e-9 else "infinitely many times"
  mean = f"{gain:+.2f}, " if with_gain else ""
  return f"{'yes' if beyond else 'no'}: {mean}{ratio} its standard error ({error:.2f})"


_PALETTE = [(60, 110, 190), (40, 150, 90), (150, 80, 170), (210, 160, 40), (30, 160, 170)]
_PALETTE += [(120, 70, 40), (220, 100, 160), (90, 90, 200), (120, 160, 40)]


def _colour(name: str, index: int):
  """The teacher grey, the student alone orange, the others in turn (``index``)."""
  if get_method(name).trains != get_method(BASELINE).trains:
    return (120, 120, 120)
  if name == BASELINE:
    return (200, 90, 60)
  return _PALETTE[index % len(_PALETTE)]


def _save_png(path: str, image):
  with epath.Path(path).open("wb") as f:  # a local file or a gs:// object
    image.save(f, format="PNG")


def bar_chart(path: str, methods: dict, protocol: str):
  """DIR/results.png: one bar of mean mIoU per method, the seeds' std as a whisker (PIL
  only; no plotting library needed)."""
  names = list(methods)
  values = [methods[n]["miou"] for n in names]
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
    draw.rectangle((x0, y0, x0 + 60, height - bottom), fill=_colour(name, i))
    std = methods[name]["miou_std"] * scale
    if std:
      draw.line((x0 + 30, y0 - std, x0 + 30, y0 + std), fill="black", width=2)
    draw.text((x0 + 8, y0 - 14 - std), f"{value:.1f}", fill="black")
    draw.text((x0, height - bottom + 8), name[:12], fill="black")
  _save_png(path, image)


def curve_chart(path: str, methods: dict, protocol: str):
  """DIR/results_curve.png: each student method's mean validation mIoU over steps, and
  the student alone's final value dashed (what steps-to-student counts up to)."""
  curves = {n: m["curve"] for n, m in methods.items() if m["curve"] and n != "teacher"}
  width, height, left, bottom, top, right = 760, 440, 60, 50, 40, 170
  image = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(image)
  draw.text((left, 10), f"validation mIoU (%) over steps, {protocol} protocol", fill="black")
  if not curves:
    draw.text(
      (left, height // 2), "no in-training validations (config.eval_every = 0)", fill="black"
    )
    _save_png(path, image)
    return
  steps = [s for c in curves.values() for s, _ in c]
  values = [v for c in curves.values() for _, v in c]
  x_max, y_max = max(steps), max(values) * 1.1 or 1.0

  def xy(step, value):
    return (
      left + (width - left - right) * step / x_max,
      height - bottom - (height - bottom - top) * value / y_max,
    )

  draw.line((left, height - bottom, width - right, height - bottom), fill="black")
  draw.line((left, top, left, height - bottom), fill="black")
  draw.text((width - right - 30, height - bottom + 8), f"{x_max}", fill="black")
  draw.text((left - 40, top), f"{y_max:.0f}", fill="black")
  if BASELINE in curves:
    y = xy(0, curves[BASELINE][-1][1])[1]
    for x in range(left, width - right, 12):
      draw.line((x, y, x + 6, y), fill=_colour(BASELINE, 0))
  for i, (name, curve) in enumerate(curves.items()):
    points = [xy(step, value) for step, value in [[0, 0.0], *curve]]
    draw.line(points, fill=_colour(name, i), width=2)
    draw.text(
      (width - right + 10, top + 16 * i), f"{name} {curve[-1][1]:.1f}", fill=_colour(name, i)
    )
  _save_png(path, image)


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
    runs[name] = {
      **run_one(label, run_config, run_dir),
      "method": run_config.method,
      "seed": run_config.seed,
      "curve": val_curve(run_dir),
    }
  if "teacher" not in runs:  # a given teacher: evaluate it for its row
    runs = {"teacher": {**_given_teacher(config, workdir), "method": "teacher"}, **runs}
  if "teacher" in configs:
    teachers[pair.teacher] = teacher_source
    source = f"trained by this recipe for {configs['teacher'].total_steps} steps"
  elif pair.teacher in teachers and config.teacher.checkpoint == teachers[pair.teacher]:
    source = f"trained by this recipe, shared with an earlier pair ({teacher_source})"
  else:
    source = f"given ({config.teacher.checkpoint})"
  models = model_rows(config, source)
  methods = by_method(runs)
  protocol = runs["teacher"]["eval"]["protocol"]
  shown = {m: row for m, row in methods.items() if m in ("teacher", *config.recipe.methods)}
  table = results_table(config, shown, models, protocol, runs["teacher"]["eval"]["num_images"])
  ablation = ablation_rows(methods) if config.recipe.ablation else None
  if ablation:
    table += f"\n## Ablation\n\n{ablation_table(ablation)}"
  return {
    "runs": runs,
    "methods": methods,
    "ablation": ablation,
    "models": models,
    "table": table,
    "protocol": protocol,
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
    bar_chart(storage.join(workdir, "results.png"), first["methods"], first["protocol"])
    curve_chart(storage.join(workdir, "results_curve.png"), first["methods"], first["protocol"])
  summary = {
    "runs": first["runs"],
    "methods": first["methods"],
    "ablation": first["ablation"],
    "models": first["models"],
    "pairs": {
      pair.title: {
        "dir": pair.subdir,
        "runs": results[pair]["runs"],
        "methods": results[pair]["methods"],
        "ablation": results[pair]["ablation"],
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
    f"wrote {storage.join(workdir, 'results.md')}, results.json, results.png and "
    "results_curve.png "
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
