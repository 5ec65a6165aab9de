"""Benchmarks: print one JSON line per measurement (never part of the tests).

    python -m transkd_jax.benchmark step --config=configs/cityscapes.py [--config.x=y] [--steps=5]
    python -m transkd_jax.benchmark data --config=configs/cityscapes.py [--workers=0,1,2]

    python -m transkd_jax.benchmark eval --config=configs/cityscapes.py [--steps=5]

``step`` times the configured method's jitted train step (bench_step.py);
``data`` the training input pipeline at Cityscapes size (bench_data.py);
``eval`` the evaluation step of the student, both protocols (bench_eval.py).

    python -m transkd_jax.benchmark model [--size=256x512] [--batch=2] [--dtype=float32]
        [--dwconv=auto,shifted,conv] [--repeats=5] [--profile=N]

``model`` times, for each depthwise-convolution form, the teacher's encoder
forward (SegFormer-B2, the features-only call TransKD uses) and the student's
forward + backward (SegFormer-B0, cross-entropy on its logits). Each number is
the median of ``repeats`` calls after a compile-and-warm-up call.

``--profile=N`` also traces three student steps with ``jax.profiler`` and
prints the N most expensive places in the model: the executed XLA ops' times
(per step), grouped by the flax module path and operation that produced them
(from the compiled HLO's metadata), split into forward and backward. This is
how PERFORMANCE.md's fact 3 was tracked down on XLA:CPU.
"""

import argparse
import collections
import glob
import gzip
import json
import re
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from transkd_jax.models import SegFormer


def _time(fn, *args, repeats):
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _op_names(hlo_text):
  """Instruction name -> op_name metadata, from compiled HLO text.

  A fusion without metadata of its own (XLA:CPU's library fusions) takes
  that of the dot / convolution / reduce inside it, else of its root, else
  that of its first operand that has one.
  """
  names, calls, operands = {}, {}, {}
  computation_ops = collections.defaultdict(list)
  computation = None
  for line in hlo_text.splitlines():
    header = re.match(r"(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if header and not line.startswith(" "):
      computation = header.group(1)
      continue
    match = re.match(r"\s*(ROOT )?%?([\w.\-]+) = \S+ ([\w\-]+)", line)
    if not match:
      continue
    op = re.search(r'op_name="([^"]*)"', line)
    op = op.group(1) if op else ""
    names[match.group(2)] = op
    called = re.search(r"calls=%?([\w.\-]+)", line)
    if called:
      calls[match.group(2)] = called.group(1)
      args = re.search(r"fusion\(([^)]*)\)", line)
      operands[match.group(2)] = re.findall(r"%([\w.\-]+)", args.group(1)) if args else []
    if op:
      key = 0 if match.group(3) in ("dot", "convolution", "reduce") else (1 if match.group(1) else 2)
      computation_ops[computation].append((key, op))
  for name, called in calls.items():
    if not names[name] and computation_ops.get(called):
      names[name] = min(computation_ops[called], key=lambda t: t[0])[1]
  for name in calls:  # still nothing (e.g. a dot traced without metadata): its inputs'
    if not names[name]:
      names[name] = next((names[o] for o in operands.get(name, []) if names.get(o)), "")
  return names


def profile_ops(fn, args, top, steps=3):
  """Rows {"pass", "where", "ms"}: per-step op time grouped by module path and op."""
  compiled = fn.lower(*args).compile()
  names = _op_names(compiled.as_text())
  jax.block_until_ready(compiled(*args))
  with tempfile.TemporaryDirectory() as logdir:
    jax.profiler.start_trace(logdir, create_perfetto_trace=True)
    for _ in range(steps):
      jax.block_until_ready(compiled(*args))
    jax.profiler.stop_trace()
    trace_file = glob.glob(f"{logdir}/**/*.trace.json.gz", recursive=True)[0]
    with gzip.open(trace_file) as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  totals = collections.Counter()
  for event in events:
    if event.get("ph") != "X" or event.get("name") not in names:
      continue
    op = names[event["name"]]
    backward = "transpose(" in op
    op = re.sub(r"jit\([^)]*\)/|transpose\(|jvp\(|\)|SegFormer\.encode/|SegFormer/", "", op)
    op = re.sub(r"block(\d)_\d+", r"block\1_*", op) or f"({event['name'].rsplit('.', 1)[0]})"
    totals[("bwd" if backward else "fwd", op)] += event["dur"] / 1000 / steps
  grand = sum(totals.values())
  rows = [{"pass": p, "where": w, "ms": round(t, 2), "share": round(t / grand, 4)}
          for (p, w), t in totals.most_common(top)]
  return rows, grand


def bench_model(size, batch, dtype, impls, repeats, profile=0):
  images = jnp.asarray(np.random.RandomState(0).rand(batch, *size, 3), jnp.float32)
  labels = jnp.zeros((batch, size[0] // 4, size[1] // 4), jnp.int32)
  for impl in impls:
    teacher = SegFormer("b2", 19, dtype=dtype, dwconv_impl=impl)
    student = SegFormer("b0", 19, dtype=dtype, dwconv_impl=impl)
    t_vars = jax.jit(teacher.init)(jax.random.key(0), images[:1])
    s_vars = jax.jit(student.init)(jax.random.key(1), images[:1])

    encode = jax.jit(lambda v, x: teacher.apply(v, x, method="encode"))

    def loss(params, state, x, y):
      out, _ = student.apply({"params": params, **state}, x, train=True,
                             rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"])
      logp = jax.nn.log_softmax(out["logits"])
      return -jnp.mean(jnp.take_along_axis(logp, y[..., None], axis=-1))

    grad = jax.jit(jax.grad(loss))
    state = {"batch_stats": s_vars["batch_stats"]}
    rows = {
        "teacher_b2_encode_s": _time(encode, t_vars, images, repeats=repeats),
        "student_b0_fwd_bwd_s": _time(grad, s_vars["params"], state, images, labels,
                                      repeats=repeats),
    }
    print(json.dumps({"bench": "model", "backend": jax.default_backend(),
                      "device": jax.devices()[0].device_kind, "size": list(size),
                      "batch": batch, "dtype": jnp.dtype(dtype).name, "dwconv": impl,
                      **{k: round(v, 5) for k, v in rows.items()}}), flush=True)
    if profile:
      ops, total = profile_ops(grad, (s_vars["params"], state, images, labels), profile)
      print(json.dumps({"bench": "profile", "model": "student_b0_fwd_bwd", "dwconv": impl,
                        "op_time_ms_per_step": round(total, 2)}), flush=True)
      for row in ops:
        print(json.dumps(row), flush=True)


def _config_benchmark(what, rest):
  """``step`` / ``data``: absl flags with an ml_collections config file."""
  import pathlib
  import sys
  from absl import app, flags
  from ml_collections import config_flags
  default = pathlib.Path(__file__).resolve().parent.parent / "configs" / "cityscapes.py"
  config = config_flags.DEFINE_config_file(
      "config", str(default) if default.exists() else None, "Config file (configs/*.py).")
  steps = flags.DEFINE_integer("steps", 5, "step, eval: timed steps after warm-up.")
  workers = flags.DEFINE_string("workers", "0,1,2", "data: grain worker counts to time.")

  def run(argv):
    del argv
    if what == "step":
      from transkd_jax.bench_step import main_step
      main_step(config.value, steps.value)
    elif what == "eval":
      from transkd_jax.bench_eval import main_eval
      main_eval(config.value, steps.value)
    else:
      from transkd_jax.bench_data import main_data
      for count in workers.value.split(","):
        main_data(config.value, int(count))

  app.run(run, argv=[sys.argv[0], *rest])


def main(argv=None):
  import sys
  argv = sys.argv[1:] if argv is None else argv
  if argv and argv[0] in ("step", "data", "eval"):
    return _config_benchmark(argv[0], argv[1:])
  parser = argparse.ArgumentParser(prog="python -m transkd_jax.benchmark")
  parser.add_argument("what", choices=["model", "step", "data", "eval"])
  parser.add_argument("--size", default="256x512", help="HxW")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--dwconv", default="auto,shifted,conv")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--profile", type=int, default=0, metavar="N",
                      help="also print the N most expensive ops of the student step")
  args = parser.parse_args(argv)
  size = tuple(int(s) for s in args.size.lower().split("x"))
  bench_model(size, args.batch, getattr(jnp, args.dtype), args.dwconv.split(","), args.repeats,
              args.profile)


if __name__ == "__main__":
  main()
