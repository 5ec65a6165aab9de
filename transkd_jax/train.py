"""Training, as one story: config -> data -> step -> metrics -> checkpoint.

    python -m transkd_jax.main --config=configs/synthetic.py --workdir=/tmp/run --mode=train

1. Build the models: the student + the method's modules (``Distiller``) and,
   when the method distils, the frozen teacher from ``config.teacher.checkpoint``
   (checked against the configured architecture before anything compiles).
2. Build the mesh, the optimiser and the data iterator.
3. Restore the newest readable checkpoint in the workdir, or initialise.
4. Loop: jitted sharded step; every ``log_every`` steps, averaged metrics to
   the console, ``metrics.jsonl`` and TensorBoard; every ``eval_every``
   validation (loss, mIoU) and a checkpoint scored by it; every
   ``checkpoint_every`` a checkpoint. SIGTERM saves and stops cleanly; a
   non-finite loss stops the run, naming the step, keeping the last good
   checkpoint.
"""

import dataclasses
import math
import signal
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from transkd_jax import checkpoint as ckpt_lib
from transkd_jax import distributed, evaluate, sharding
from transkd_jax.distill import Distiller, check_pairing, get_method, loss_settings
from transkd_jax.errors import UserError
from transkd_jax.logs import MetricWriter
from transkd_jax.models import SegFormer
from transkd_jax.optim import make_optimizer
from transkd_jax.train_step import (TrainState, init_state, jit_train_step,
                                    make_train_step, state_shardings)


class TrainingDiverged(UserError):
  """The loss became NaN or infinite."""


@dataclasses.dataclass
class Models:
  """What one run trains and distils from."""
  model: Distiller                      # student (+ modules), trained
  method: str                           # the distillation method the objective uses
  teacher: Optional[SegFormer] = None   # frozen; None when the method needs none
  teacher_variables: Optional[dict] = None
  initial_student: Optional[dict] = None


def _dtype(name):
  return jnp.dtype(name)


def build_models(config, restore: bool = True) -> Models:
  """The models of ``config``; the teacher is restored and checked here, before compiling.

  ``config.method == "teacher"`` trains a SegFormer of ``config.teacher.variant``
  (from ``config.teacher.init``, e.g. a converted ImageNet MiT, when set).
  ``restore=False`` (benchmarks) reads no checkpoint: the caller initialises.
  """
  size = tuple(config.image_size)
  dtype = _dtype(config.dtype)
  common = dict(num_classes=config.num_classes, dtype=dtype,
                fusion_channels=int(config.distill.get("fusion_channels", 64)),
                gl_heads=int(config.distill.get("gl_heads", 8)),
                gl_residual=bool(config.distill.get("gl_residual", False)),
                gl_mix_init=tuple(config.distill.get("gl_mix_init", (1.0, 1.0))))
  if config.method == "teacher":
    variant = config.teacher.variant
    model = Distiller("student", variant, variant, **common)
    init = _restore_segformer(config.teacher.get("init") if restore else "",
                              "config.teacher.init", variant, config)
    return Models(model, "student", initial_student=init)
  method = get_method(config.method)
  model = Distiller(config.method, config.student.variant, config.teacher.variant, **common)
  init = _restore_segformer(config.student.get("init") if restore else "",
                            "config.student.init", config.student.variant, config)
  if method.teacher_call is None:
    return Models(model, config.method, initial_student=init)
  teacher = SegFormer(config.teacher.variant, config.num_classes,
                      dtype=_dtype(config.get("teacher_dtype") or config.dtype))
  if not restore:
    return Models(model, config.method, teacher, None, init)
  if not config.teacher.get("checkpoint"):
    raise UserError(f"method {config.method!r} distils from a teacher: set "
                    "config.teacher.checkpoint to an Orbax directory (transkd_jax.convert's "
                    "output, or the workdir of a --config.method=teacher run)")
  variables = _restore_segformer(config.teacher.checkpoint, "config.teacher.checkpoint",
                                 config.teacher.variant, config)
  try:
    check_pairing(model, teacher, size)
  except ValueError as e:
    raise UserError(f"teacher and student do not pair: {e}") from None
  return Models(model, config.method, teacher, variables, init)


def _restore_segformer(path, what, variant, config):
  if not path:
    return None
  variables = ckpt_lib.restore_model_variables(path, what)
  model = SegFormer(variant, config.num_classes)
  expected = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  ckpt_lib.check_variables(
      variables, {"params": expected["params"], "batch_stats": expected["batch_stats"]}, what,
      f"SegFormer-{str(variant).upper()} with {config.num_classes} classes "
      "(config.teacher.variant / config.student.variant / config.num_classes)")
  return jax.tree.map(np.asarray, variables)  # host arrays: placed on the mesh by the caller


def check_batch_size(config, mesh):
  data_devices = mesh.shape["data"]
  if config.batch_size % data_devices or config.batch_size % jax.process_count():
    raise UserError(f"config.batch_size={config.batch_size} must divide evenly over the "
                    f"{data_devices} devices of the mesh's data axis and "
                    f"{jax.process_count()} processes")


class _Preemption:
  """SIGTERM (preemption) -> save after a step and stop.

  One process: a handler sets a flag the loop reads after every step. Several:
  JAX's preemption service owns SIGTERM and agrees on a step every process
  reaches (``reached_preemption_sync_point``), so all of them save that same
  step together, whichever received the signal and when.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._multi = jax.process_count() > 1

  def __enter__(self):
    if not self._multi:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # not the main thread: no handler
        self._previous = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def reached(self, step: int) -> bool:
    """Whether to save and stop after ``step``; call once per step, on every process."""
    if self._multi:
      from jax.experimental import multihost_utils
      self.requested = multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def run_validation(config, mesh, eval_step, state) -> dict:
  variables = {"params": state.params["student"], "batch_stats": state.batch_stats["student"]}
  scores = evaluate.evaluate_split(config, mesh, eval_step, variables,
                                   config.get("eval_split", "val"))
  return {"miou": scores["miou"], "pixel_acc": scores["pixel_acc"], "loss": scores["loss"],
          "images": scores["num_images"], "skipped_bad_files": scores["skipped_bad_files"]}


def train(config, workdir: str) -> dict:
  """Trains (or resumes) the run in ``workdir``; returns a summary dict."""
  from transkd_jax import data

  chief = jax.process_index() == 0  # the one process that prints and writes logs
  models = build_models(config)  # the teacher is checked before anything compiles
  settings = loss_settings(models.method, config.distill)
  total_steps = int(config.total_steps)
  try:
    mesh = sharding.make_mesh(tuple(config.mesh_shape))
    optimizer, schedule = make_optimizer(config.optimizer, total_steps)
  except ValueError as e:
    raise UserError(str(e)) from None
  check_batch_size(config, mesh)
  size = tuple(config.image_size)

  train_iter = data.make_train_iterator(config)
  init = lambda: init_state(models.model, optimizer, size, config.seed,  # noqa: E731
                            models.initial_student)
  abstract = jax.eval_shape(init)
  shardings = state_shardings(abstract, mesh, config.sharding)
  checkpoints = ckpt_lib.RunCheckpoints(workdir, keep=config.keep_checkpoints,
                                        best_metric="val_miou", best_mode="max")
  abstract_dict = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract.as_dict(), shardings.as_dict())
  restored, restored_step = checkpoints.restore(abstract_dict, train_iter)
  if restored is not None:
    state = TrainState(**restored)
    if chief:
      print(f"resumed from {checkpoints.directory}/{restored_step} (step {int(state.step)})",
            flush=True)
  else:
    state = jax.jit(init, out_shardings=shardings)()
  teacher_vars = models.teacher_variables
  teacher_sharding = None
  if teacher_vars is not None:
    teacher_sharding = sharding.tree_shardings(teacher_vars, mesh, config.sharding)
    teacher_vars = sharding.put_global(teacher_vars, teacher_sharding)
  step_fn = jit_train_step(
      make_train_step(models.model, models.teacher, models.method, settings, optimizer,
                      schedule, config.seed, config.get("class_weights") or None),
      mesh, shardings, teacher_sharding)
  protocol = config.get("eval_protocol", "standard")
  evaluate.check_protocol(protocol)
  eval_step = evaluate.make_eval_step(
      SegFormer(evaluate.trained_variant(config), config.num_classes, dtype=_dtype(config.dtype)),
      config.num_classes, protocol, mesh)

  writer = MetricWriter(workdir)
  start = int(state.step)
  summary = {"start_step": start, "status": "done"}
  window, window_start = [], time.perf_counter()
  last_val = None
  skipped = 0  # bad files passed over by this process (config.data.skip_bad_files)
  from tqdm import tqdm
  bar = tqdm(total=total_steps, initial=start, disable=not chief,
             unit="step", dynamic_ncols=True, mininterval=1.0)
  distributed.barrier("train:loop")  # gloo's first collective waits only 30 s for the others
  with _Preemption() as preemption:
    step = start
    while step < total_steps:
      batch = next(train_iter)
      skipped += int(np.sum(batch.get("skipped", 0)))
      batch = sharding.global_batch({"image": batch["image"], "label": batch["label"]}, mesh)
      state, metrics = step_fn(state, teacher_vars, batch)
      step += 1
      metrics = jax.device_get(metrics)
      if not math.isfinite(float(metrics["loss"])):
        checkpoints.wait()
        last = checkpoints.latest_step()
        raise TrainingDiverged(
            f"the loss became {float(metrics['loss'])} at step {step} "
            f"({', '.join(f'{k}={float(v):.4g}' for k, v in metrics.items())}); last good "
            f"checkpoint: {'none' if last is None else f'{checkpoints.directory}/{last}'}")
      window.append(metrics)
      bar.update(1)
      bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", refresh=False)
      if step % config.log_every == 0 or step == total_steps:
        elapsed = time.perf_counter() - window_start
        scalars = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
        scalars["lr"] = float(metrics["lr"])
        scalars["steps_per_s"] = len(window) / elapsed
        scalars["imgs_per_s"] = len(window) * config.batch_size / elapsed
        writer.write(step, "train", scalars)
        window, window_start = [], time.perf_counter()
      val = None
      if config.eval_every and (step % config.eval_every == 0 or step == total_steps):
        val = run_validation(config, mesh, eval_step, state)
        writer.write(step, "val", val)
        if chief:
          bar.write(f"step {step}: val mIoU {val['miou']:.4f} "
                    f"({config.get('eval_protocol', 'standard')} protocol), "
                    f"pixel acc {val['pixel_acc']:.4f}, loss {val['loss']:.4f}")
        last_val = val
      preempted = preemption.reached(step)
      save_now = (val is not None or step == total_steps or preempted or
                  (config.checkpoint_every and step % config.checkpoint_every == 0))
      if save_now:
        checkpoints.save(step, state.as_dict(), train_iter, config,
                         metrics={"val_miou": val["miou"]} if val else None, force=True)
      if preempted:
        summary["status"] = "preempted"
        if chief:
          bar.write(f"SIGTERM: saved step {step} to {checkpoints.directory}; exiting")
        break
  bar.close()
  checkpoints.close()
  writer.close()
  summary.update(step=int(step), checkpoint_dir=checkpoints.directory, skipped_bad_files=skipped)
  if skipped:
    print(f"process {jax.process_index()} skipped {skipped} reads of unreadable training files "
          "(a bad file counts once per epoch; config.data.skip_bad_files=True; the warnings "
          "above name them)", flush=True)
  if last_val:
    summary["val"] = last_val
  return summary
