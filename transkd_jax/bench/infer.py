"""``benchmark infer``: a deployed student, our jitted serving path against onnxruntime.

    python -m transkd_jax.benchmark infer --checkpoint=WORKDIR_OR_DIR \\
        [--sizes=512x1024,1024x2048] [--batch=1] [--steps=10]

For each size, in one process and on the same inputs (random uint8 pixels): the
label map at the input size, computed by

- ``jax``: ``--mode=predict``'s jitted function (``predict.make_predict_fn``: the
  normalisation, the model, the bilinear resize to the input size, arg-max), and
- ``onnxruntime``: the ``--format=onnx --argmax`` model of the same weights
  (built in memory, CPU execution provider, its default threads),

each timed over ``--steps`` calls after one warm-up call (which also compiles). One
JSON line per size: p50 / p90 latency (ms), images per second at p50, the process's
peak resident memory while that engine ran (``peak_rss_mib``: the kernel's high-water
mark, reset before each engine; it includes what the process held before, given as
``rss_before_mib``), the share of pixels on which the two label maps agree, and
``onnx_vs_jax``: onnxruntime's p50 over ours (> 1: ours is faster). The CPU is named
in every line: absolute times are this machine's.
"""

import gc
import os
import platform
import statistics
import time

import jax
import numpy as np

from transkd_jax.checkpoint import restore_model_variables
from transkd_jax.errors import UserError
from transkd_jax.models import archs
from transkd_jax.predict import make_predict_fn
from transkd_jax.weights.hf_config import input_settings
from transkd_jax.weights.infer import infer_model
from transkd_jax.weights.record import recorded_model
from transkd_jax.weights.writers import onnx_for_export


def parse_sizes(text: str):
  """ "512x1024,1024x2048" -> ((512, 1024), (1024, 2048)); UserError unless multiples of 32."""
  sizes = []
  for item in text.split(","):
    try:
      height, width = (int(v) for v in item.lower().split("x"))
    except ValueError:
      raise UserError(f"--sizes={text!r}: expected HxW[,HxW...], e.g. 512x1024") from None
    if height <= 0 or width <= 0 or height % 32 or width % 32:
      raise UserError(f"--sizes: {item} is not two positive multiples of 32")
    sizes.append((height, width))
  return tuple(sizes)


def cpu_name() -> str:
  """The CPU's model name (from /proc/cpuinfo where there is one)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _rss_mib(field: str) -> float:
  """VmRSS / VmHWM of this process in MiB (0 where /proc is not Linux's)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return 0.0


def _reset_peak_rss():
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
  except OSError:
    pass


def _timed(fn, steps: int) -> dict:
  """Runs ``fn`` once to warm up, then ``steps`` times: latency and memory."""
  gc.collect()
  before = _rss_mib("VmRSS")
  _reset_peak_rss()
  out = fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return {
    "p50_ms": round(1e3 * statistics.median(times), 2),
    "p90_ms": round(1e3 * float(np.percentile(times, 90)), 2),
    "peak_rss_mib": round(_rss_mib("VmHWM"), 1),
    "rss_before_mib": round(before, 1),
  }, out


def load_student(checkpoint: str):
  """(model, variables, family, name, spec, num_classes, normalisation) of ``checkpoint``."""
  variables, source = restore_model_variables(checkpoint, "--checkpoint", with_source=True)
  family, name, spec, num_classes = infer_model(variables, None, recorded_model(checkpoint))
  norm, _, _, _ = input_settings(checkpoint, "auto", source)
  model = archs.build(family, spec, num_classes, kernels="cpu" if _on_cpu() else "native")
  return model, variables, family, name, spec, num_classes, norm


def _on_cpu() -> bool:
  return jax.default_backend() == "cpu"


def _calls(predict, variables, session, pixels):
  """The two engines' calls on the same pixels, each returning the label map."""
  size = pixels.shape[1:3]
  on_device = jax.device_put(pixels)
  nchw = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))
  return (
    lambda: jax.block_until_ready(predict(variables, on_device, size)),
    lambda: session.run(["labels"], {"pixels": nchw})[0],
  )


def bench_infer(checkpoint: str, sizes, batch: int = 1, steps: int = 10):
  """Yields one row (dict) per size."""
  if batch < 1 or steps < 1:
    raise UserError(f"--batch={batch}, --steps={steps}: both must be at least 1")
  onnx_for_export()
  import onnxruntime as ort  # the onnx extra; onnx_for_export said how to install it

  from transkd_jax.weights.onnx_models import onnx_model

  model, variables, family, name, spec, num_classes, norm = load_student(checkpoint)
  graph = onnx_model(variables, family, spec, num_classes, norm, argmax=True).SerializeToString()
  variables = jax.device_put(variables)
  predict = make_predict_fn(model, resize=False, input_norm=(norm, norm))
  known = archs.from_checkpoint_name(name)  # name: the public one, "mit_b0"
  label = archs.model_name(*known) if known else f"{archs.ARCHS[family].label} (custom)"
  session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
  rng = np.random.default_rng(0)
  for height, width in sizes:
    pixels = rng.integers(0, 256, (batch, height, width, 3), dtype=np.uint8)
    run_ours, run_theirs = _calls(predict, variables, session, pixels)
    ours, ours_labels = _timed(run_ours, steps)
    theirs, theirs_labels = _timed(run_theirs, steps)
    for row in (ours, theirs):
      row["img_per_s"] = round(1e3 * batch / row["p50_ms"], 3)
    yield {
      "bench": "infer",
      "model": label,
      "size": f"{height}x{width}",
      "batch": batch,
      "normalization": norm,
      "device": str(jax.devices()[0].device_kind),
      "cpu": cpu_name(),
      "cpu_count": len(os.sched_getaffinity(0)),
      "jax": ours,
      "onnxruntime": {**theirs, "version": ort.__version__},
      "onnx_vs_jax": round(theirs["p50_ms"] / ours["p50_ms"], 3),
      "labels_agree": round(float(np.mean(np.asarray(ours_labels) == theirs_labels)), 6),
    }
