"""The transkd-jax entry point.

    python -m transkd_jax.main --config=configs/cityscapes.py --workdir=DIR --mode=info

``--config.key=value`` overrides any config value. Modes:

- ``train``: train, or resume the run in the workdir (transkd_jax/train.py);
- ``eval``: mIoU, per-class IoU and pixel accuracy of the run's best checkpoint
  (or ``config.eval.checkpoint``) on ``config.eval_split``, written to
  ``WORKDIR/eval_results.json`` (transkd_jax/evaluate.py);
- ``predict``: label / colour / overlay PNGs for ``config.predict.input``
  (transkd_jax/predict.py);
- ``info``: parameters and GFLOPs of the teacher, student and training-time
  model, written to ``WORKDIR/info.json``.
"""

import json
import os
import pathlib
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from transkd_jax.config import validate_config
from transkd_jax.errors import UserError

_REPO_CONFIG = pathlib.Path(__file__).resolve().parent.parent / "configs" / "cityscapes.py"



def _bad_override(error):
  """A --config.key=value that does not fit the config: one clear line, exit 2.

  ml_collections raises a bare KeyError/AttributeError (a traceback) for a key
  the config does not have; say which override and what to do instead.
  """
  overrides = [a.split("=")[0] for a in sys.argv[1:] if a.startswith("--config.")]
  print(f"error: cannot apply config override(s) {', '.join(overrides)}: {error!s}. "
        "Overrides must name keys the config file defines, with values of their type "
        "(read the config file).", file=sys.stderr)
  sys.exit(2)


try:  # the default config is loaded, and overridden from sys.argv, right here
  _CONFIG = config_flags.DEFINE_config_file(
      "config", str(_REPO_CONFIG) if _REPO_CONFIG.exists() else None,
      "Path to a config file (configs/*.py); override values with --config.key=value.",
      lock_config=True)
except (KeyError, AttributeError) as e:
  _bad_override(e)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for outputs (created if missing).")
_MODE = flags.DEFINE_enum("mode", "info", ["info", "train", "eval", "predict"], "What to run.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0, for multi-process runs started by "
    "hand (TPU pods and SLURM are detected automatically).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout", 100, "Multi-process runs: seconds after which a process that sent no "
    "heartbeat counts as dead and the others stop with an error.")

def run_info(config, workdir: str) -> dict:
  """Prints and writes DIR/info.json: params and GFLOPs of teacher and student."""
  import jax.numpy as jnp
  from transkd_jax.info import FLOPS_NOTE, model_info
  from transkd_jax.models import SegFormer

  size = tuple(config.image_size)
  info = {}
  for role in ("teacher", "student"):
    model = SegFormer(config[role].variant, config.num_classes, dtype=getattr(jnp, config.dtype))
    info[role] = {"variant": config[role].variant, **model_info(model, size)}
  from transkd_jax.distill import build_distiller, get_method
  if config.method != "teacher":
    distiller = build_distiller(config)
    info["distiller"] = {"method": config.method,
                         "description": get_method(config.method).description,
                         **model_info(distiller, size)}
  info["input_size"] = list(size)
  info["note"] = FLOPS_NOTE
  print(f"input {size[0]}x{size[1]}, {config.num_classes} classes")
  for role in ("teacher", "student"):
    row = info[role]
    print(f"  {role:8s} SegFormer-{row['variant'].upper()}: {row['params']:,} parameters, "
          f"{row['gflops']:.2f} GFLOPs")
  row = info.get("distiller", {"method": "teacher", "description": "the teacher alone",
                                "params": info["teacher"]["params"],
                                "gflops": info["teacher"]["gflops"]})
  print(f"  training-time model ({row['method']}: {row['description']}): "
        f"{row['params']:,} parameters, {row['gflops']:.2f} GFLOPs")
  print(f"  ({FLOPS_NOTE})")
  path = os.path.join(workdir, "info.json")
  import jax
  if jax.process_index() == 0:
    with open(path, "w") as f:
      json.dump(info, f, indent=2)
    print(f"wrote {path}")
  return info


def run_train(config, workdir: str) -> dict:
  from transkd_jax.train import train
  for key in ("batch_size", "total_steps", "log_every"):
    if not isinstance(config.get(key), int) or config.get(key) < 1:
      raise UserError(f"config.{key} must be a positive integer, got {config.get(key)!r}")
  summary = train(config, workdir)
  line = f"{summary['status']}: step {summary['step']}, checkpoints in {summary['checkpoint_dir']}"
  if "val" in summary:
    line += (f"; val mIoU {summary['val']['miou']:.4f} "
             f"({config.get('eval_protocol', 'standard')} protocol) on "
             f"{summary['val']['images']} images")
  print(line, flush=True)
  return summary


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
    from transkd_jax import distributed
    try:
      distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                             _HEARTBEAT.value)
    except ValueError as e:
      raise UserError(str(e)) from None
    import jax
    if jax.process_index() != 0:  # one console: process 0 prints; errors (stderr) from all
      sys.stdout = open(os.devnull, "w")
    os.makedirs(_WORKDIR.value, exist_ok=True)
    if _MODE.value == "info":
      run_info(config, _WORKDIR.value)
    elif _MODE.value == "train":
      run_train(config, _WORKDIR.value)
    elif _MODE.value == "eval":
      from transkd_jax.evaluate import run_eval
      run_eval(config, _WORKDIR.value)
    elif _MODE.value == "predict":
      from transkd_jax.predict import run_predict
      run_predict(config, _WORKDIR.value)
  except UserError as e:
    logging.flush()
    print(f"error: {e}", file=sys.stderr)
    _exit(2)
  except Exception:
    if not _multi_process():
      raise
    import jax
    traceback.print_exc()
    print(f"error: process {jax.process_index()} of {jax.process_count()} failed (above); "
          "when another process died first, its output names the cause", file=sys.stderr)
    _exit(1)


def _multi_process() -> bool:
  return "jax" in sys.modules and sys.modules["jax"].process_count() > 1


def _exit(code: int):
  """Exits; in a multi-process run at once, without JAX's shutdown barrier.

  A process that fails alone would otherwise wait in that barrier while the
  others wait for it in theirs; exiting at once stops its heartbeats, and
  the others stop with an error after --heartbeat_timeout seconds.
  """
  if _multi_process():
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  sys.exit(code)


if __name__ == "__main__":
  try:
    app.run(main)
  except (KeyError, AttributeError) as e:
    if flags.FLAGS.is_parsed():
      raise  # a bug in main, not a bad override
    _bad_override(e)
