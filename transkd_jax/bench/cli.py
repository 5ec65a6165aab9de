"""The benchmarks' command line: ``WHAT --config=FILE [--config.x=y] [flags]``."""

import json
import pathlib
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from transkd_jax.bench.compile import compile_report, does_not_fit, topology_devices
from transkd_jax.bench.data import bench_data
from transkd_jax.bench.eval import bench_eval
from transkd_jax.bench.infer import bench_infer, parse_sizes
from transkd_jax.bench.model import bench_model
from transkd_jax.bench.step import bench_step
from transkd_jax.config import resolve_batch_size, validate_config
from transkd_jax.errors import UserError

WHAT = ("step", "data", "eval", "model", "compile", "infer")
_DEFAULT = pathlib.Path(__file__).resolve().parents[2] / "configs" / "cityscapes.py"

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  str(_DEFAULT) if _DEFAULT.exists() else None,
  "Config file (configs/*.py); override values with --config.key=value.",
  lock_config=True,
)
_STEPS = flags.DEFINE_integer("steps", 5, "step, eval, model, infer: timed calls after warm-up.")
_WORKERS = flags.DEFINE_string(
  "workers", "0,1,2", "data: grain worker counts to time ('auto': config.data.num_workers='auto')."
)
_KERNELS = flags.DEFINE_string(
  "kernels", "cpu,native", "model: kernel forms to time (transkd_jax/models/kernels.py)."
)
_TOPOLOGY = flags.DEFINE_string(
  "topology",
  "local",
  "compile: a TPU topology (v5e:2x2, "
  "v5e:4x4, v4:2x2x2, v5p:2x2x2 ...), NVIDIA GPUs (a100, h100, h200; h100:8 for 8 of one "
  "host; needs JAX's CUDA plugin) or 'local' (this process's devices).",
)
_PROFILE = flags.DEFINE_integer(
  "profile",
  0,
  "model, step: also trace three steps and print the N ops that took the most time (model: "
  "the student's step; step: the whole train step).",
)
_CHECKPOINT = flags.DEFINE_string(
  "checkpoint", None, "infer: a training run's workdir or a transkd_jax.convert directory."
)
_SIZES = flags.DEFINE_string(
  "sizes", "512x1024,1024x2048", "infer: input sizes HxW (multiples of 32), comma-separated."
)
_BATCH = flags.DEFINE_integer("batch", 1, "infer: images per call.")
_SAVE_HLO = flags.DEFINE_string(
  "save_hlo",
  "",
  "compile: also write the compiled train step's HLO text to this file (per-device batch "
  "B: FILE.bB), to read or recount its traffic later.",
)
_PER_DEVICE = flags.DEFINE_string(
  "per_device_batch_sizes",
  "",
  "compile, step: per-device batches to compile (compile: memory, fits, roofline bound) or "
  "time (step) the train step at, e.g. 2,4,8,16,32, one JSON line each; empty: the config's "
  "batch (compile: with the eval step).",
)


def _per_device_sizes(text: str):
  try:
    sizes = [int(v) for v in text.split(",")]
  except ValueError:
    sizes = []
  if not sizes or min(sizes) < 1:
    raise UserError(f"--per_device_batch_sizes={text!r}: expected positive integers, e.g. 2,4,8")
  return sizes


def _print(row):
  print(json.dumps(row), flush=True)


def _main(argv):
  if len(argv) != 2 or argv[1] not in WHAT:
    raise app.UsageError(
      f"usage: python -m transkd_jax.benchmark {{{'|'.join(WHAT)}}} "
      "--config=FILE [--config.key=value] [flags]"
    )
  what, config = argv[1], _CONFIG.value
  try:
    if what == "infer":  # a trained model, no config
      if not _CHECKPOINT.value:
        raise UserError("infer needs --checkpoint=WORKDIR_OR_DIR (a run or a convert output)")
      for row in bench_infer(
        _CHECKPOINT.value, parse_sizes(_SIZES.value), _BATCH.value, _STEPS.value
      ):
        _print(row)
      return
    validate_config(config)
    # A per-device batch counts the devices the step is for: the topology's for compile.
    devices = topology_devices(_TOPOLOGY.value) if what == "compile" else jax.devices()
    resolve_batch_size(config, len(devices))
    if what == "step":
      for per_device in _per_device_sizes(_PER_DEVICE.value) if _PER_DEVICE.value else [0]:
        if per_device:  # one line per batch, in one process
          config.batch_size = per_device * len(devices)
        _print(bench_step(config, steps=_STEPS.value, profile=_PROFILE.value))
    elif what == "eval":
      for protocol in ("standard", "reference"):
        _print(bench_eval(config, protocol, _STEPS.value))
    elif what == "data":
      for count in _WORKERS.value.split(","):
        _print(bench_data(config, count if count == "auto" else int(count)))
    elif what == "compile" and _PER_DEVICE.value:
      for per_device in _per_device_sizes(_PER_DEVICE.value):  # a line each, fits or not
        config.batch_size = per_device * len(devices)
        hlo = f"{_SAVE_HLO.value}.b{per_device}" if _SAVE_HLO.value else ""
        _print(compile_report(config, _TOPOLOGY.value, with_eval=False, save_hlo=hlo))
    elif what == "compile":
      row = compile_report(config, _TOPOLOGY.value, save_hlo=_SAVE_HLO.value)
      _print(row)
      problem = does_not_fit(row)
      if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(1)
    else:
      bench_model(config, _KERNELS.value.split(","), _STEPS.value, _PROFILE.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def run():
  app.run(_main)
