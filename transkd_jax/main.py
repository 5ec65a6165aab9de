"""The transkd-jax entry point.

    python -m transkd_jax.main --config=configs/cityscapes.py --workdir=DIR [--mode=MODE]

``--config.key=value`` overrides any config value. Modes:

- ``train`` (the default): train, or resume the run in the workdir
  (transkd_jax/train.py);
- ``eval``: mIoU, per-class IoU and pixel accuracy of the run's best checkpoint
  (or ``config.eval.checkpoint``) on ``config.eval_split``, written to
  ``WORKDIR/eval_results.json`` (transkd_jax/evaluate.py);
- ``predict``: label / colour / overlay PNGs for ``config.predict.input``
  (transkd_jax/predict.py);
- ``info``: parameters and GFLOPs of the teacher, student and training-time
  model, written to ``WORKDIR/info.json`` (transkd_jax/info.py);
- ``recipe``: a teacher, then the student by each of ``config.recipe.methods``,
  evaluated, and their table in ``WORKDIR/results.md`` (transkd_jax/recipe.py).

Every mode starts the same way: the config is validated once, then
``jax.distributed`` joins the processes of a multi-process run.
"""

if __name__ == "__main__":  # before the imports below, which a re-exec would repeat
  from transkd_jax import hugepages

  hugepages.reexec()  # huge pages for XLA:CPU's buffers (transkd_jax/hugepages.py)

import os
import pathlib
import sys
import traceback

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from transkd_jax import compile_cache, distributed, storage
from transkd_jax.config import resolve_batch_size, validate_config
from transkd_jax.errors import UserError
from transkd_jax.evaluate import run_eval
from transkd_jax.info import run_info
from transkd_jax.predict import run_predict
from transkd_jax.recipe import run_recipe
from transkd_jax.train import CheckpointWriteFailed, train

_REPO_CONFIG = pathlib.Path(__file__).resolve().parent.parent / "configs" / "cityscapes.py"


def _bad_override(error):
  """A --config.key=value that does not fit the config: one clear line, exit 2.

  ml_collections raises a bare KeyError/AttributeError (a traceback) for a key
  the config does not have; say which override and what to do instead.
  """
  overrides = [a.split("=")[0] for a in sys.argv[1:] if a.startswith("--config.")]
  print(
    f"error: cannot apply config override(s) {', '.join(overrides)}: {error!s}. "
    "Overrides must name keys the config file defines, with values of their type "
    "(read the config file).",
    file=sys.stderr,
  )
  sys.exit(2)


try:  # the default config is loaded, and overridden from sys.argv, right here
  _CONFIG = config_flags.DEFINE_config_file(
    "config",
    str(_REPO_CONFIG) if _REPO_CONFIG.exists() else None,
    "Path to a config file (configs/*.py); override values with --config.key=value.",
    lock_config=True,
  )
except (KeyError, AttributeError) as e:
  _bad_override(e)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for outputs (created if missing).")
MODES = ("train", "eval", "predict", "info", "recipe")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to run (default: train).")
_DISTRIBUTED = flags.DEFINE_enum(
  "distributed",
  "auto",
  ("auto", "on", "off"),
  "Multi-process start-up: 'on' lets JAX find "
  "the cluster (Cloud TPU VM slices, GKE, SLURM, MPI); 'auto' does so when the environment "
  "lists several processes (SLURM, TPU_WORKER_HOSTNAMES); 'off': one process.",
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address",
  None,
  "HOST:PORT of process 0, for multi-process runs started by "
  "hand (TPU slices and SLURM need no address: see --distributed).",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_HEARTBEAT = flags.DEFINE_integer(
  "heartbeat_timeout",
  100,
  "Multi-process runs: seconds after which a process that sent no "
  "heartbeat counts as dead and the others stop with an error.",
)


def run_train(config, workdir: str) -> dict:
  summary = train(config, workdir)
  line = f"{summary['status']}: step {summary['step']}, checkpoints in {summary['checkpoint_dir']}"
  if "val" in summary:
    line += (
      f"; val mIoU {summary['val']['miou']:.4f} ({config.eval_protocol} protocol) on "
      f"{summary['val']['images']} images"
    )
  print(line, flush=True)
  return summary


# What ``--mode`` runs: fn(config, workdir).
RUNNERS = {
  "train": run_train,
  "eval": run_eval,
  "predict": run_predict,
  "info": run_info,
  "recipe": run_recipe,
}


def main(argv):
  if not any(a.startswith(("--verbosity", "-v")) for a in sys.argv[1:]):
    logging.set_verbosity(logging.WARNING)  # library INFO chatter (Orbax) off by default
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  try:
    if config is None:
      raise UserError("no config: pass --config=configs/<name>.py")
    if not _WORKDIR.value:
      raise UserError("--workdir is required (a directory for outputs)")
    validate_config(config)
    cache = compile_cache.enable(config.compile_cache)  # before anything compiles
    try:
      distributed.initialize(
        _COORDINATOR.value,
        _NUM_PROCESSES.value,
        _PROCESS_ID.value,
        _HEARTBEAT.value,
        _DISTRIBUTED.value,
      )
    except ValueError as e:
      raise UserError(str(e)) from None
    if jax.process_index() != 0:  # one console: process 0 prints; errors (stderr) from all
      sys.stdout = open(os.devnull, "w")
    batch = resolve_batch_size(config, jax.device_count())
    if _MODE.value in ("train", "recipe"):
      print(f"{batch}; compile cache {cache}", flush=True)
    storage.makedirs(_WORKDIR.value)  # a local directory or a gs:// URI
    RUNNERS[_MODE.value](config, _WORKDIR.value)
  except UserError as e:
    logging.flush()
    print(f"error: {e}", file=sys.stderr)
    # A failed checkpoint write leaves Orbax's writers pending: exit without the
    # interpreter's teardown, which would bury the line above under their tracebacks.
    _exit(2, at_once=isinstance(e, CheckpointWriteFailed))
  except Exception:
    if not _multi_process():
      raise
    traceback.print_exc()
    print(
      f"error: process {jax.process_index()} of {jax.process_count()} failed (above); "
      "when another process died first, its output names the cause",
      file=sys.stderr,
    )
    _exit(1)


def _multi_process() -> bool:
  return "jax" in sys.modules and sys.modules["jax"].process_count() > 1


def _exit(code: int, at_once: bool = False):
  """Exits; in a multi-process run at once, without JAX's shutdown barrier.

  A process that fails alone would otherwise wait in that barrier while the
  others wait for it in theirs; exiting at once stops its heartbeats, and
  the others stop with an error after --heartbeat_timeout seconds.
  """
  if at_once or _multi_process():
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  sys.exit(code)


def run(default_mode: str = None):
  """Runs main under absl; ``default_mode`` replaces ``--mode``'s default (old entry points)."""
  if default_mode:
    flags.FLAGS.set_default("mode", default_mode)
  try:
    app.run(main)
  except (KeyError, AttributeError) as e:
    if flags.FLAGS.is_parsed():
      raise  # a bug in main, not a bad override
    _bad_override(e)


if __name__ == "__main__":
  run()
