"""Training, as one story: config -> data -> step -> metrics -> checkpoint.

    python -m transkd_jax.main --config=configs/synthetic.py --workdir=/tmp/run

1. Build the run (``build.training``): the trained model + the method's
   modules (``Distiller``), the frozen teacher from ``config.teacher.checkpoint``
   when the method distils (checked before anything compiles), the mesh, the
   optimiser and the jitted steps; then the data iterator.
2. Restore the newest readable checkpoint in the workdir, or initialise.
3. Loop: the sharded step, compiled ahead of the first; every ``log_every``
   steps, averaged metrics to the console, ``metrics.jsonl`` and TensorBoard
   (with throughput: img/s, the fraction of time waiting for data, TFLOP/s
   per device and MFU, compile and evaluation time left out; a trace of
   ``config.profile_steps`` in WORKDIR/profile); every ``eval_every``
   validation (loss, mIoU) and a checkpoint scored by it; every
   ``checkpoint_every`` a checkpoint. SIGTERM saves and stops cleanly; a
   non-finite loss stops the run, naming the step, keeping the last good
   checkpoint.
"""

import contextlib
import math
import signal
import sys
import threading
import time
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from transkd_jax import (
  build,
  compile_cache,
  data,
  distributed,
  normalization,
  resume,
  sharding,
  storage,
  throughput,
)
from transkd_jax import checkpoint as ckpt_lib
from transkd_jax.errors import UserError
from transkd_jax.eval_step import evaluate_split, make_eval_step
from transkd_jax.logs import MetricWriter
from transkd_jax.train_step import TrainState

# WORKDIR/run_status.json, written as a run ends: {"status": "done" | "preempted", "step",
# "total_steps"} (launch/slurm.sbatch and launch/tpu_pod.sh --watch read it).
STATUS_FILE = "run_status.json"


class TrainingDiverged(UserError):
  """The loss became NaN or infinite."""


class CheckpointWriteFailed(UserError):
  """A checkpoint could not be written (a full disk, lost storage)."""


@contextlib.contextmanager
def _checkpoint_writes(checkpoints):
  """A failed checkpoint write (an asynchronous one surfaces at the next save or at
  the end) stops the run, naming the newest complete checkpoint it resumes from."""
  try:
    yield
  except Exception as e:
    latest = checkpoints.latest_step()
    raise CheckpointWriteFailed(
      f"writing a checkpoint to {checkpoints.directory} failed ({type(e).__name__}: "
      f"{str(e)[:400]}). The newest complete checkpoint is "
      f"{'none' if latest is None else f'{checkpoints.directory}/{latest}'} (an unfinished "
      "one is never taken for complete); free space or fix the storage, then start the same "
      "command again: it resumes from there"
    ) from e


class _Preemption:
  """SIGTERM (preemption) -> save the last completed step and stop.

  ``reached()`` is asked after every step, before every evaluation batch and after
  the step's compile, by every process at the same points. One process: a
  handler sets the flag it returns. Several: JAX's preemption service owns
  SIGTERM and agrees on one of these points that every process reaches
  (``reached_preemption_sync_point``, counted here), so all of them stop at the
  same place and save the same step together, whichever received the signal.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._multi = jax.process_count() > 1
    self._points = 0

  def __enter__(self):
    if not self._multi:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # not the main thread: no handler
        self._previous = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def reached(self) -> bool:
    """Whether to stop here; every process calls it at the same points."""
    if self._multi and not self.requested:
      self._points += 1
      self.requested = multihost_utils.reached_preemption_sync_point(self._points)
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
      f"{'none' if last is None else f'{checkpoints.directory}/{last}'}"
    )


class _Speed:
  """Training throughput since the last restart: steps, seconds, time waiting for data.

  Restarted after compiling, at each log step, and after evaluations and
  saves, so the rates count training steps only. Timed on the host between
  log steps, whose metrics fetch waits for the device: the window's rate is
  the device's (or the input pipeline's, if that is slower).
  """

  def __init__(self):
    self.restart()

  def restart(self):
    self.start, self.steps, self.data_wait = time.perf_counter(), 0, 0.0

  def rates(self, batch_size: int, flops: float, devices) -> dict:
    """imgs_per_s, steps_per_s, data_wait (fraction of the time spent in ``next(data)``),
    tflops_per_device and mfu (where the device's peak is known)."""
    if not self.steps:
      return {}
    seconds = max(time.perf_counter() - self.start, 1e-9)
    out = {
      "steps_per_s": self.steps / seconds,
      "imgs_per_s": self.steps * batch_size / seconds,
      "data_wait": self.data_wait / seconds,
    }
    if math.isfinite(flops):
      out.update(throughput.rates(flops * self.steps, seconds, devices))
    return out


def _speed_text(scalars: dict) -> str:
  if "imgs_per_s" not in scalars:
    return ""
  text = f", {scalars['imgs_per_s']:.2f} img/s, data wait {100 * scalars['data_wait']:.0f}%"
  if "tflops_per_device" in scalars:
    text += f", {scalars['tflops_per_device']:.3g} TFLOP/s per device"
  if "mfu" in scalars:
    text += f", MFU {100 * scalars['mfu']:.1f}%"
  return text


def _compile(run: build.Training, state, teacher_vars, batch, chief: bool):
  """The train step compiled for these arguments, and its FLOPs per step (all devices).

  A second start of the same run reads the traced program and XLA's compiled one from
  ``config.compile_cache`` (``compile_cache.compiled_step``)."""
  start = time.perf_counter()
  args = (state, teacher_vars, batch)
  # What the trace reads besides the arguments: the config and what the build derived
  # from files (the modules as built, the teacher checkpoint's normalisation).
  teacher = run.teacher
  salt = "\n".join(
    [str(run.config), repr(run.model), run.kernels]
    + ([repr(teacher.model), teacher.input_norm] if teacher is not None else [])
  )
  key = compile_cache.program_key("train_step", args, salt=salt)
  out_shardings = (run.state_shardings, sharding.replicated(run.mesh))
  step = compile_cache.compiled_step(run.train_step, args, out_shardings, key)
  flops = float("nan")
  if run.config.count_flops:
    flops = compile_cache.remembered(
      step.program,
      "step_flops",
      lambda: throughput.step_flops(
        run.train_step, state, teacher_vars, batch, compiled=step.executable
      ),
    )
  if chief:
    work = (
      f" ({flops / 1e9 / run.config.batch_size:.1f} GFLOP per image)"
      if math.isfinite(flops)
      else ""
    )
    how = "stored program read in" if step.stored else "tracing"
    print(
      f"compiled the train step in {time.perf_counter() - start:.1f} s ({how} "
      f"{step.trace_s:.1f} s, XLA {step.xla_s:.1f} s){work}",
      flush=True,
    )
  return step.call, flops


def _compile_unless_stopped(run, state, teacher_vars, batch, chief, preemption):
  """``_compile``'s result, or None when SIGTERM came first.

  One process: the compile runs in a thread while this one watches the flag, so a
  signal during a long compile (minutes on a TPU slice) stops the run at once. Several:
  they compile in step and ask ``preemption.reached()`` together afterwards.
  """
  if jax.process_count() > 1:
    # gloo's first collective over the step's devices gives up after 30 s: the processes
    # meet before the stored program's all-gather (after a first batch that may come at
    # different times) and after XLA's compile (which may take one much longer).
    distributed.barrier("train:compile")
    compiled = _compile(run, state, teacher_vars, batch, chief)
    distributed.barrier("train:compiled")
    return compiled
  result = {}

  def work():
    try:
      result["value"] = _compile(run, state, teacher_vars, batch, chief)
    except BaseException as e:  # raised again in this thread
      result["error"] = e

  thread = threading.Thread(target=work, name="compile", daemon=True)
  thread.start()
  while thread.is_alive():
    thread.join(0.2)
    if preemption.requested:
      return None
  if "error" in result:
    raise result["error"]
  return result["value"]


class _Profile:
  """``config.profile_steps`` = (first, last): a ``jax.profiler`` trace of those steps
  (numbered as logged, from 1) in ``directory`` (TensorBoard's profile plugin, Perfetto)."""

  def __init__(self, steps, directory: str):
    steps = tuple(steps)
    self.first, self.last = steps if steps else (0, -1)
    self.directory, self.active = directory, False

  def before(self, step: int):
    if step == self.first:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, step: int, state):
    if self.active and step >= self.last:
      self.close(state)

  def close(self, state=None):
    if self.active:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.active = False
      if jax.process_index() == 0:
        print(f"profile of steps {self.first}-{self.last}: {self.directory}", flush=True)


def check_teacher(run: build.Training) -> Optional[dict]:
  """The teacher's mIoU on the first ``config.teacher.check_images`` validation images.

  Run before distilling: a teacher given the wrong input normalisation, or the
  wrong checkpoint, scores near zero here instead of quietly teaching noise.
  """
  config = run.config
  teacher = run.teacher
  if teacher is None or teacher.variables is None or not config.teacher.check_images:
    return None
  student_norm = normalization.of_transforms(config.data.transforms)
  step = make_eval_step(
    teacher.model,
    config.num_classes,
    config.eval_protocol,
    run.mesh,
    input_norm=(student_norm, teacher.input_norm),
  )
  scores = evaluate_split(
    config,
    run.mesh,
    step,
    teacher.variables,
    config.eval_split,
    limit=config.teacher.check_images,
  )
  return {"miou": scores["miou"], "images": scores["num_images"]}


def run_validation(run: build.Training, state, stop=None) -> Optional[dict]:
  """Validation scores; None when ``stop()`` said to stop part-way (preemption)."""
  config = run.config
  scores = evaluate_split(
    config, run.mesh, run.eval_step, run.deployed(state), config.eval_split, stop=stop
  )
  if scores is None:
    return None
  return {
    "miou": scores["miou"],
    "pixel_acc": scores["pixel_acc"],
    "loss": scores["loss"],
    "images": scores["num_images"],
    "skipped_bad_files": scores["skipped_bad_files"],
  }


def train(config, workdir: str) -> dict:
  """Trains (or resumes) the run in ``workdir``; returns a summary dict.

  SIGTERM from here on saves the last completed step and stops (``_Preemption``)."""
  with _Preemption() as preemption:
    return _train(config, workdir, preemption)


def _train(config, workdir: str, preemption) -> dict:
  chief = jax.process_index() == 0  # the one process that prints and writes logs
  resume.check(workdir, config)  # another run's checkpoints: stop before anything is built
  run = build.training(config)  # the teacher is checked before anything compiles
  if chief and run.teacher is not None:
    print(
      f"teacher input: {run.teacher.input_norm} normalisation ({run.teacher.input_norm_source})",
      flush=True,
    )
  total_steps = config.total_steps
  # Two batches ahead on the devices (their copies overlap the step); the data state a
  # checkpoint saves is that after the last batch trained on.
  train_iter = data.DevicePrefetch(
    data.make_train_iterator(config),
    lambda b: (
      sharding.global_batch({"image": b["image"], "label": b["label"]}, run.mesh),
      int(np.sum(b.get("skipped", 0))),
    ),
  )
  checkpoints = ckpt_lib.RunCheckpoints(
    workdir, keep=config.keep_checkpoints, best_metric="val_miou", best_mode="max"
  )
  abstract_state = run.abstract_state.as_dict()
  saved_shapes = checkpoints.saved_shapes()
  if saved_shapes is not None:
    resume.check_shapes(workdir, saved_shapes, abstract_state)
  restored, restored_step = checkpoints.restore(abstract_state, train_iter)
  checked = None  # the teacher check, on a fresh start only
  if restored is not None:
    state = TrainState(**restored)
    if chief:
      print(
        f"resumed from {checkpoints.directory}/{restored_step} (step {int(state.step)})", flush=True
      )
  else:
    state = run.new_state()
    checked = check_teacher(run)
    if checked is not None and chief:
      print(
        f"teacher check: mIoU {100 * checked['miou']:.2f} ({config.eval_protocol} protocol) "
        f"on the first {checked['images']} {config.eval_split} images",
        flush=True,
      )
  teacher_vars, mesh = run.teacher_variables(), run.mesh

  writer = MetricWriter(workdir)
  start = int(state.step)
  summary = {"start_step": start, "status": "done"}
  if checked is not None:
    summary["teacher_check"] = checked
  status_path = storage.join(workdir, STATUS_FILE)
  before = storage.read_json(status_path) if restored is not None else None
  distributed.barrier("train:status")  # every process read it before process 0 writes
  if chief:  # a stale "done" must not outlive a run made longer
    storage.write_json(
      status_path, {"status": "running", "step": start, "total_steps": total_steps}
    )
  window = []  # the metrics of the steps since the last log step (device arrays)
  speed = _Speed()
  last_val = None
  if start >= total_steps and config.eval_every and (before or {}).get("status") == "preempted":
    # The last run saved its final step unscored (SIGTERM during that validation).
    last_val = run_validation(run, state, stop=preemption.reached)
    if last_val is not None:
      writer.write(start, "val", last_val)
      if chief:
        print(f"step {start}: val mIoU {last_val['miou']:.4f} (the final validation)", flush=True)
  skipped = 0  # bad files passed over by this process (config.data.skip_bad_files)

  # A progress bar on a terminal; in a log file (SLURM, nohup) one plain line per log step.
  interactive = sys.stdout.isatty()
  bar = tqdm(
    total=total_steps,
    initial=start,
    disable=not (chief and interactive),
    unit="step",
    dynamic_ncols=True,
    mininterval=1.0,
  )
  profile = _Profile(config.profile_steps, storage.join(workdir, "profile"))
  step_fn, flops = None, float("nan")
  distributed.barrier("train:loop")  # gloo's first collective waits only 30 s for the others
  step = start
  while step < total_steps:
    waited = time.perf_counter()
    batch, skipped_here = next(train_iter)
    speed.data_wait += time.perf_counter() - waited
    skipped += skipped_here
    if step_fn is None:  # compiled ahead of the first step: its time is not the step's
      compiled = _compile_unless_stopped(run, state, teacher_vars, batch, chief, preemption)
      if compiled is None or preemption.reached():
        summary["status"] = "preempted"
        if chief:
          bar.write(
            f"SIGTERM before the first step: step {step} is the last completed one "
            f"({'saved before' if step else 'a fresh run: nothing to save'}); exiting"
          )
        break
      step_fn, flops = compiled
      speed.restart()
    profile.before(step + 1)
    state, metrics = step_fn(state, teacher_vars, batch)
    step += 1
    speed.steps += 1
    profile.after(step, state)
    window.append(metrics)  # device arrays: no host sync per step (dispatch runs ahead)
    bar.update(1)
    eval_now = bool(config.eval_every) and (step % config.eval_every == 0 or step == total_steps)
    log_now = step % config.log_every == 0 or step == total_steps
    preempted = preemption.reached()
    save_now = (
      eval_now
      or step == total_steps
      or preempted
      or bool(config.checkpoint_every and step % config.checkpoint_every == 0)
    )
    if log_now or save_now:
      # One sync: the window's metrics come to the host and are checked, so a
      # non-finite state is never evaluated or saved.
      window = jax.device_get(window)
      check_finite(window, step - len(window) + 1, checkpoints)
    if log_now:
      scalars = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
      scalars["lr"] = float(window[-1]["lr"])
      scalars.update(speed.rates(config.batch_size, flops, list(mesh.devices.flat)))
      writer.write(step, "train", scalars)
      bar.set_postfix(loss=f"{float(window[-1]['loss']):.4f}", refresh=False)
      if chief and not interactive:
        print(
          f"step {step}/{total_steps}: loss {scalars['loss']:.4f}, lr {scalars['lr']:.3g}"
          f"{_speed_text(scalars)}",
          flush=True,
        )
      window = []
      speed.restart()
    val, when = None, ""
    if eval_now and not preempted:
      val = run_validation(run, state, stop=preemption.reached)
      if val is None:  # SIGTERM during validation: save the step unscored
        preempted, save_now, when = True, True, " during validation"
    if val is not None:
      writer.write(step, "val", val)
      if chief:
        bar.write(
          f"step {step}: val mIoU {val['miou']:.4f} "
          f"({config.eval_protocol} protocol), "
          f"pixel acc {val['pixel_acc']:.4f}, loss {val['loss']:.4f}"
        )
      last_val = val
    if save_now:
      with _checkpoint_writes(checkpoints):
        checkpoints.save(
          step,
          state.as_dict(),
          train_iter,
          config,
          metrics={"val_miou": val["miou"]} if val else None,
          force=True,
        )
    if eval_now or save_now:
      speed.restart()  # throughput counts training steps only, not evaluation or saving
    if preempted:
      summary["status"] = "preempted"
      if chief:
        bar.write(
          f"SIGTERM{when}: saved step {step}{' (unscored)' if when else ''} to "
          f"{checkpoints.directory}; exiting"
        )
      break
  profile.close(state)
  bar.close()
  with _checkpoint_writes(checkpoints):
    checkpoints.close()
  writer.close()
  summary.update(step=int(step), checkpoint_dir=checkpoints.directory, skipped_bad_files=skipped)
  if chief:  # what a supervisor reads to decide whether to start the run again
    storage.write_json(
      status_path, {"status": summary["status"], "step": int(step), "total_steps": total_steps}
    )
  if skipped:
    print(
      f"process {jax.process_index()} skipped {skipped} reads of unreadable training files "
      "(a bad file counts once per epoch; config.data.skip_bad_files=True; the warnings "
      "above name them)",
      flush=True,
    )
  if last_val:
    summary["val"] = last_val
  return summary
