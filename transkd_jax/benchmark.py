"""Benchmarks: print one JSON line per measurement (never part of the tests).

    python -m transkd_jax.benchmark model [--size=256x512] [--batch=2] [--dtype=float32]
        [--dwconv=auto,shifted,conv] [--repeats=5]

``model`` times, for each depthwise-convolution form, the teacher's encoder
forward (SegFormer-B2, the features-only call TransKD uses) and the student's
forward + backward (SegFormer-B0, cross-entropy on its logits). Each number is
the median of ``repeats`` calls after a compile-and-warm-up call.
"""

import argparse
import json
import statistics
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


def bench_model(size, batch, dtype, impls, repeats):
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


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m transkd_jax.benchmark")
  parser.add_argument("what", choices=["model"])
  parser.add_argument("--size", default="256x512", help="HxW")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--dwconv", default="auto,shifted,conv")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)
  size = tuple(int(s) for s in args.size.lower().split("x"))
  bench_model(size, args.batch, getattr(jnp, args.dtype), args.dwconv.split(","), args.repeats)


if __name__ == "__main__":
  main()
