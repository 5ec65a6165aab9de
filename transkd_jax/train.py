"""Training, as one story: config -> data -> step -> metrics -> checkpoint.

    python -m transkd_jax.main --config=configs/synthetic.py --workdir=/tmp/run

1. Build the run (``build.training``): the trained model + the method's
   modules (``Distiller``), the frozen teacher from ``config.teacher.checkpoint``
   when the method distils (checked before anything compiles), the mesh, the
   optimiser and the jitted steps; then the data iterator.
2. Restore the newest readable checkpoint in the workdir, or initialise.
3. Loop: jitted sharded step; every ``log_every`` steps, averaged metrics to
   the console, ``metrics.jsonl`` and TensorBoard; every ``eval_every``
   validation (loss, mIoU) and a checkpoint scored by it; every
   ``checkpoint_every`` a checkpoint. SIGTERM saves and stops cleanly; a
   non-finite loss stops the run, naming the step, keeping the last good
   checkpoint.
"""

import math
import signal
import sys
import time
from typing import Optional

import jax
import numpy as np

from transkd_jax import build, distributed, evaluate, sharding
from transkd_jax import checkpoint as ckpt_lib
from transkd_jax.errors import UserError
from transkd_jax.logs import MetricWriter
from transkd_jax.train_step import TrainState


class TrainingDiverged(UserError):
  """The loss became NaN or infinite."""


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


def check_finite(rows, first_step: int, checkpoints=None):
  """Raises TrainingDiverged naming the first of ``rows`` (host metrics of consecutive
  steps from ``first_step``) whose loss is not finite, and the last good checkpoint."""
  for i, metrics in enumerate(rows):
    loss = float(metrics["loss"])
    if math.isfinite(loss):
      continue
    last = None
    if checkpoints is not None:
      checkpoints.wait()
      last = checkpoints.latest_step()
    raise TrainingDiverged(
        f"the loss became {loss} at step {first_step + i} "
        f"({', '.join(f'{k}={float(v):.4g}' for k, v in metrics.items())}); no non-finite "
        f"state was saved; last good checkpoint: "
        f"{'none' if last is None else f'{checkpoints.directory}/{last}'}")


def check_teacher(run: build.Training) -> Optional[dict]:
  """The teacher's mIoU on the first ``config.teacher.check_images`` validation images.

  Run before distilling: a teacher given the wrong input normalisation, or the
  wrong checkpoint, scores near zero here instead of quietly teaching noise.
  """
  config = run.config
  if run.teacher is None or run.teacher_variables is None or not config.teacher.check_images:
    return None
  from transkd_jax import normalization
  student_norm = normalization.of_transforms(config.data.transforms)
  step = evaluate.make_eval_step(run.teacher, config.num_classes, config.eval_protocol, run.mesh,
                                 input_norm=(student_norm, run.teacher_norm))
  scores = evaluate.evaluate_split(config, run.mesh, step, run.teacher_variables,
                                   config.eval_split, limit=config.teacher.check_images)
  return {"miou": scores["miou"], "images": scores["num_images"]}


def run_validation(run: build.Training, state) -> dict:
  config = run.config
  scores = evaluate.evaluate_split(config, run.mesh, run.eval_step, run.deployed(state),
                                   config.eval_split)
  return {"miou": scores["miou"], "pixel_acc": scores["pixel_acc"], "loss": scores["loss"],
          "images": scores["num_images"], "skipped_bad_files": scores["skipped_bad_files"]}


def train(config, workdir: str) -> dict:
  """Trains (or resumes) the run in ``workdir``; returns a summary dict."""
  from transkd_jax import data

  chief = jax.process_index() == 0  # the one process that prints and writes logs
  run = build.training(config)  # the teacher is checked before anything compiles
  if chief and run.teacher is not None:
    print(f"teacher input: {run.teacher_norm} normalisation ({run.teacher_norm_source})",
          flush=True)
  total_steps = config.total_steps
  train_iter = data.make_train_iterator(config)
  checkpoints = ckpt_lib.RunCheckpoints(workdir, keep=config.keep_checkpoints,
                                        best_metric="val_miou", best_mode="max")
  restored, restored_step = checkpoints.restore(run.abstract_state.as_dict(), train_iter)
  checked = None  # the teacher check, on a fresh start only
  if restored is not None:
    state = TrainState(**restored)
    if chief:
      print(f"resumed from {checkpoints.directory}/{restored_step} (step {int(state.step)})",
            flush=True)
  else:
    state = run.new_state()
    checked = check_teacher(run)
    if checked is not None and chief:
      print(f"teacher check: mIoU {100 * checked['miou']:.2f} ({config.eval_protocol} protocol) "
            f"on the first {checked['images']} {config.eval_split} images", flush=True)
  step_fn, teacher_vars, mesh = run.train_step, run.teacher_variables, run.mesh

  writer = MetricWriter(workdir)
  start = int(state.step)
  summary = {"start_step": start, "status": "done"}
  if checked is not None:
    summary["teacher_check"] = checked
  window, window_start = [], time.perf_counter()
  last_val = None
  skipped = 0  # bad files passed over by this process (config.data.skip_bad_files)
  from tqdm import tqdm
  # A progress bar on a terminal; in a log file (SLURM, nohup) one plain line per log step.
  interactive = sys.stdout.isatty()
  bar = tqdm(total=total_steps, initial=start, disable=not (chief and interactive),
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
      window.append(metrics)  # device arrays: no host sync per step (dispatch runs ahead)
      bar.update(1)
      eval_now = bool(config.eval_every) and (step % config.eval_every == 0 or
                                              step == total_steps)
      log_now = step % config.log_every == 0 or step == total_steps
      preempted = preemption.reached(step)
      save_now = (eval_now or step == total_steps or preempted or
                  bool(config.checkpoint_every and step % config.checkpoint_every == 0))
      if log_now or save_now:
        # One sync: the window's metrics come to the host and are checked, so a
        # non-finite state is never evaluated or saved.
        window = jax.device_get(window)
        check_finite(window, step - len(window) + 1, checkpoints)
      if log_now:
        elapsed = time.perf_counter() - window_start
        scalars = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
        scalars["lr"] = float(window[-1]["lr"])
        scalars["steps_per_s"] = len(window) / elapsed
        scalars["imgs_per_s"] = len(window) * config.batch_size / elapsed
        writer.write(step, "train", scalars)
        bar.set_postfix(loss=f"{float(window[-1]['loss']):.4f}", refresh=False)
        if chief and not interactive:
          print(f"step {step}/{total_steps}: loss {scalars['loss']:.4f}, lr {scalars['lr']:.3g}, "
                f"{scalars['imgs_per_s']:.2f} img/s", flush=True)
        window, window_start = [], time.perf_counter()
      val = None
      if eval_now:
        val = run_validation(run, state)
        writer.write(step, "val", val)
        if chief:
          bar.write(f"step {step}: val mIoU {val['miou']:.4f} "
                    f"({config.eval_protocol} protocol), "
                    f"pixel acc {val['pixel_acc']:.4f}, loss {val['loss']:.4f}")
        last_val = val
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
