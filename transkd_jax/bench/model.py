"""``benchmark model``: the teacher's encoder and the student's forward + backward.

For each kernel form (``--kernels``: cpu, native, and tpu or gpu on those devices;
transkd_jax/models/kernels.py),
times the teacher's encoder forward (the features-only call TransKD uses) and the student's
forward + backward (cross-entropy on its logits), at ``config.image_size``,
``config.batch_size`` and ``config.dtype``, for ``config.teacher.variant`` and
``config.student.variant``. Each number is the median of ``--steps`` calls
after a compile-and-warm-up call.

``--profile=N`` also traces three student steps with ``jax.profiler`` and
prints the N most expensive places in the model: the executed XLA ops' times
(per step), grouped by the flax module path and operation that produced them,
split into forward and backward. XLA:CPU's trace events carry only HLO
instruction names, so the module paths are read from the compiled HLO's
op_name metadata.
"""

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

from transkd_jax.errors import UserError
from transkd_jax.models import archs, kernels


def median_seconds(fn, *args, repeats):
  """Median seconds of ``fn(*args)`` over ``repeats`` calls, after one warm-up call."""
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
      key = (
        0 if match.group(3) in ("dot", "convolution", "reduce") else (1 if match.group(1) else 2)
      )
      computation_ops[computation].append((key, op))
  for name, called in calls.items():
    if not names[name] and computation_ops.get(called):
      names[name] = min(computation_ops[called], key=lambda t: t[0])[1]
  for name in calls:  # still nothing (e.g. a dot traced without metadata): its inputs'
    if not names[name]:
      names[name] = next((names[o] for o in operands.get(name, []) if names.get(o)), "")
  return names


def _instruction(event, names):
  """The HLO instruction a trace event ran: its name (XLA:CPU, XLA:TPU, XLA:GPU's own
  kernels) or, for a library kernel on a GPU (cuBLAS, cuDNN), its ``hlo_op`` argument."""
  if event.get("ph") != "X":
    return None
  for name in (event.get("name"), (event.get("args") or {}).get("hlo_op")):
    if name in names:
      return name
  return None


def _where(op: str, roots: dict) -> str:
  """An op_name as a module path: jit(...)/, jvp( and transpose( dropped, the root module
  renamed by ``roots`` ({"SegFormer": "teacher/"}), method scopes (student.encode/)
  dropped, and blocks of a stage merged (block1_*)."""
  op = re.sub(r"jit\([^)]*\)/|transpose\(|jvp\(|\)", "", op)
  root = re.match(r"(\w+)(?:\.\w+)?/", op)
  if root and root.group(1) in roots:
    op = roots[root.group(1)] + op[root.end() :]
  op = re.sub(r"\w+\.\w+/", "", op)
  return re.sub(r"block(\d)_\d+", r"block\1_*", op)


def profile_ops(compiled, run_once, top, steps=3, roots=None):
  """Rows {"pass", "where", "ms", "share"}: per-step op time of ``compiled`` (a compiled
  program; ``run_once()`` runs it once and waits), grouped by module path and op
  (``_where``; ``roots``: root module -> prefix, default the student SegFormer's none)."""
  roots = {"SegFormer": ""} if roots is None else roots
  names = _op_names(compiled.as_text())
  run_once()
  with tempfile.TemporaryDirectory() as logdir:
    jax.profiler.start_trace(logdir, create_perfetto_trace=True)
    for _ in range(steps):
      run_once()
    jax.profiler.stop_trace()
    trace_file = glob.glob(f"{logdir}/**/*.trace.json.gz", recursive=True)[0]
    with gzip.open(trace_file) as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  totals = collections.Counter()
  for event in events:
    instruction = _instruction(event, names)
    if instruction is None:
      continue
    op = names[instruction]
    backward = "transpose(" in op
    op = _where(op, roots) or f"({instruction.rsplit('.', 1)[0]})"
    totals[("bwd" if backward else "fwd", op)] += event["dur"] / 1000 / steps
  grand = sum(totals.values())
  rows = [
    {"pass": p, "where": w, "ms": round(t, 2), "share": round(t / grand, 4)}
    for (p, w), t in totals.most_common(top)
  ]
  return rows, grand


def bench_model(config, forms, repeats, profile=0):
  """Prints one JSON line per kernel form (and the profile rows)."""
  size, batch = tuple(config.image_size), config.batch_size
  dtype = jnp.dtype(config.dtype)
  images = jnp.asarray(np.random.RandomState(0).rand(batch, *size, 3), jnp.float32)
  labels = jnp.zeros((batch, size[0] // 4, size[1] // 4), jnp.int32)
  for form in forms:  # a form these devices lack (tpu or gpu on a CPU): before any compile
    try:
      kernels.resolve_for(form, jax.devices()[0])
    except ValueError as e:
      raise UserError(f"--kernels={','.join(forms)}: {e}") from None
  for form in forms:
    teacher, student = (
      archs.build(
        config[role].arch, config[role].variant, config.num_classes, dtype=dtype, kernels=form
      )
      for role in ("teacher", "student")
    )
    t_vars = jax.jit(teacher.init)(jax.random.key(0), images[:1])
    s_vars = jax.jit(student.init)(jax.random.key(1), images[:1])

    encode = jax.jit(lambda v, x, teacher=teacher: teacher.apply(v, x, method="encode"))

    def loss(params, state, x, y, student=student):
      out, _ = student.apply(
        {"params": params, **state},
        x,
        train=True,
        rngs={"dropout": jax.random.key(0)},
        mutable=["batch_stats"],
      )
      logp = jax.nn.log_softmax(out["logits"])
      return -jnp.mean(jnp.take_along_axis(logp, y[..., None], axis=-1))

    grad = jax.jit(jax.grad(loss))
    state = {"batch_stats": s_vars.get("batch_stats", {})}
    rows = {
      "teacher_encode_s": median_seconds(encode, t_vars, images, repeats=repeats),
      "student_fwd_bwd_s": median_seconds(
        grad, s_vars["params"], state, images, labels, repeats=repeats
      ),
    }
    print(
      json.dumps(
        {
          "bench": "model",
          "backend": jax.default_backend(),
          "device": jax.devices()[0].device_kind,
          "size": list(size),
          "batch": batch,
          "dtype": dtype.name,
          "kernels": form,
          "teacher": f"{config.teacher.arch} {config.teacher.variant}",
          "student": f"{config.student.arch} {config.student.variant}",
          **{k: round(v, 5) for k, v in rows.items()},
        }
      ),
      flush=True,
    )
    if profile:
      args = (s_vars["params"], state, images, labels)
      compiled = grad.lower(*args).compile()
      run_once = lambda c=compiled, a=args: jax.block_until_ready(c(*a))  # noqa: E731
      ops, total = profile_ops(compiled, run_once, profile)
      print(
        json.dumps(
          {
            "bench": "profile",
            "model": "student_fwd_bwd",
            "kernels": form,
            "op_time_ms_per_step": round(total, 2),
          }
        ),
        flush=True,
      )
      for row in ops:
        print(json.dumps(row), flush=True)
