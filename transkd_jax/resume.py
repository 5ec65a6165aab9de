"""A workdir holds one run: before resuming, its checkpoints are checked to be this run's.

``check(workdir, config)`` runs first thing in ``train()``, before anything is built
or compiled: when the workdir already holds checkpoints, the config saved with the
newest one is compared with the config given, key by key. Keys that only change how
a run is watched or how long it lasts (``SAFE``) may differ, and are printed; any
other difference stops the run with an error naming each key and both values, and
nothing in the workdir changes. ``config.resume_allow`` (comma-separated keys, e.g.
``data.root,teacher.checkpoint`` after moving files) lets the named keys differ too.
``check_shapes`` does the same for the saved tensors against the state the config
builds (a changed model definition with the same config).

Keys that one of the two configs lacks (a run saved by an older version) are not
compared.
"""

import json

import jax

from transkd_jax import checkpoint as ckpt_lib
from transkd_jax import storage
from transkd_jax.errors import UserError

# Keys that may differ on resume without being allowed: when to log, evaluate and
# save, how many checkpoints to keep, the run's length, how fast data is read, and
# keys other modes read.
SAFE = (
  "total_steps",
  "log_every",
  "eval_every",
  "checkpoint_every",
  "keep_checkpoints",
  "profile_steps",
  "count_flops",
  "compile_cache",
  "data.num_workers",  # the data state is the number of batches read: any worker count
  "data.prefetch",
  # The same batch per update in less memory (an out-of-memory resume may raise it);
  # only BatchNorm's statistics see the micro-batches (transkd_jax/train_step.py).
  "grad_accum_steps",
  "resume_allow",
  "teacher.check_images",
  "eval.",
  "predict.",
  "recipe.",
)
SHOWN = 12  # differences listed in an error, at most


def flatten(tree, prefix: str = "") -> dict:
  """{"a.b": value} for a nested dict (a config as JSON)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def _safe(key: str, allowed) -> bool:
  """Whether ``key`` is one of ``SAFE`` or ``allowed``, or under one of them (a
  section: "eval." or "eval" covers every key in config.eval)."""
  return any(key == k.rstrip(".") or key.startswith(k.rstrip(".") + ".") for k in (*SAFE, *allowed))


def allowed_keys(config) -> tuple:
  """``config.resume_allow`` as keys or sections; each must be in the config."""
  keys = tuple(k.strip().rstrip(".") for k in str(config.resume_allow).split(",") if k.strip())
  known = flatten(json.loads(config.to_json_best_effort()))
  unknown = [k for k in keys if k not in known and not any(q.startswith(k + ".") for q in known)]
  if unknown:
    raise UserError(
      f"config.resume_allow names {', '.join(unknown)}, which the config does not have "
      "(keys as in --config.KEY, e.g. total_steps,data.root)"
    )
  return keys


def differences(saved: dict, current: dict, allowed=()) -> tuple:
  """(refused, accepted): lists of (key, saved value, current value) for keys both
  configs have and whose values differ; accepted are the SAFE or allowed ones."""
  saved, current = flatten(saved), flatten(current)
  refused, accepted = [], []
  for key in sorted(saved.keys() & current.keys()):
    if saved[key] != current[key]:
      (accepted if _safe(key, allowed) else refused).append((key, saved[key], current[key]))
  return refused, accepted


def _how_to_go_on(workdir: str) -> str:
  return (
    f"Nothing in {workdir} was changed. To go on: give this run another --workdir; or, "
    "if it is the same run and these keys are safe to change for it (e.g. data.root "
    "or teacher.checkpoint after moving files there), pass --config.resume_allow=KEY1,KEY2."
  )


def check(workdir: str, config) -> None:
  """Raises UserError when ``workdir``'s checkpoints were saved with a config that
  differs from ``config`` in a key that is neither SAFE nor allowed; prints the
  accepted differences."""
  saved = ckpt_lib.saved_config(workdir)
  if saved is None:
    return
  current = json.loads(config.to_json_best_effort())
  refused, accepted = differences(saved, current, allowed_keys(config))
  directory = storage.join(workdir, ckpt_lib.CHECKPOINT_DIR)
  if refused:
    lines = [f"  {k}: {s!r} in the saved run, {c!r} now" for k, s, c in refused[:SHOWN]]
    if len(refused) > SHOWN:
      lines.append(f"  ... and {len(refused) - SHOWN} more")
    raise UserError(
      f"{directory} holds the checkpoints of another run: its config differs from this "
      "one in\n" + "\n".join(lines) + "\n" + _how_to_go_on(workdir)
    )
  if accepted and jax.process_index() == 0:
    changed = ", ".join(f"{k} {s!r} -> {c!r}" for k, s, c in accepted)
    print(f"resuming {directory} with changed keys: {changed}", flush=True)
    if any(k == "total_steps" for k, _, _ in accepted) and not config.optimizer.decay_steps:
      print(
        "  (config.optimizer.decay_steps is 0: the learning-rate schedule decays over "
        "total_steps, so from here on it follows the new length)",
        flush=True,
      )


def check_shapes(workdir: str, saved_shapes: dict, abstract_state) -> None:
  """Raises UserError listing the tensors whose presence or shape differs between a
  checkpoint (``saved_shapes``: {"params/student/...": shape}) and ``abstract_state``."""
  expected = ckpt_lib.tree_shapes(abstract_state)
  lines = []
  for name in sorted(saved_shapes.keys() | expected.keys()):
    saved, now = saved_shapes.get(name), expected.get(name)
    if saved != now:
      lines.append(
        f"  {name}: "
        + ("absent" if saved is None else str(saved))
        + " in the checkpoint, "
        + ("absent" if now is None else str(now))
        + " now"
      )
  if lines:
    shown = lines[:SHOWN] + ([f"  ... and {len(lines) - SHOWN} more"] if len(lines) > SHOWN else [])
    raise UserError(
      f"{storage.join(workdir, ckpt_lib.CHECKPOINT_DIR)} holds tensors of other shapes than this "
      "run's state (the same config, another model definition?):\n"
      + "\n".join(shown)
      + "\n"
      + _how_to_go_on(workdir)
    )
