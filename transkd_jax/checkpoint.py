"""Orbax checkpoints of a run: train state, data-iterator state and config.

``WORKDIR/checkpoints/<step>/`` holds three items: ``state`` (the train state
as a plain pytree), ``data`` (every process's grain iterator state, one
``process_<i>-of-<n>.json`` each) and ``config`` (JSON). Every process's
iterator state is the same (the number of global batches read; see
transkd_jax/data/pipeline.py), so a run resumed on another number of processes
takes process 0's. Saves are asynchronous and atomic (Orbax writes to a
temporary directory and renames it when complete), so a crash never leaves a
half-written checkpoint that looks finished. Kept: the last
``config.keep_checkpoints`` and the best by validation metric.

Restoring walks back from the newest step: a checkpoint that cannot be read
(damage: a truncated or missing file) is skipped with a warning naming it, set
aside as ``<step>.damaged``, and the previous one is used, by every process
together. A transient storage error is retried, never taken for damage; a
workdir whose checkpoints all fail to read stops the run.
"""

import dataclasses
import json
import re
import time
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from transkd_jax import distributed, normalization, storage
from transkd_jax.errors import UserError

CHECKPOINT_DIR = "checkpoints"
CONVERT_RECORD = normalization.CONVERT_RECORD  # beside a transkd_jax.convert output

# On CPU and TPU Orbax saves a replicated array split across its replicas, which
# compiles one slicing program per array shape at every start (about 160 for a
# distillation state, seconds of each save). Arrays whose share would be under
# 1 MiB are saved whole by one replica; larger ones are still split. (No PRNG
# key arrays are saved, so the handler needs no array-metadata store.)
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _register_array_handler():
  absl_logger = logging.get_absl_logger()
  level = absl_logger.level
  absl_logger.setLevel("ERROR")  # Orbax warns that the handler is replaced: that is the point
  try:
    handler = ocp.type_handlers.ArrayHandler(
      min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES
    )
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
  finally:
    absl_logger.setLevel(level)


_register_array_handler()


class DataStateHandler(grain.checkpoint.CheckpointHandler):
  """grain's iterator handler for any iterator whose ``get_state`` is a JSON-able dict (a
  grain ``DatasetIterator``, or ``data.DevicePrefetch`` around one); restores on another
  process count from process 0's file."""

  def save(self, directory, item=None, args=None):
    item = item or args.item
    own = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    (epath.Path(directory) / own).write_text(json.dumps(item.get_state(), indent=4))

  def restore(self, directory, item=None, args=None):
    item = item or args.item
    directory = epath.Path(directory)
    own = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    written = [own] if own.exists() else sorted(directory.glob("process_0-of-*.json"))
    if not written:
      raise ValueError(f"{directory} holds no data-iterator state (process_*-of-*.json)")
    item.set_state(json.loads(written[0].read_text()))
    if hasattr(item, "start_prefetch"):
      item.start_prefetch()
    return item


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
  item: Any


def _metric_fn(name):
  return lambda metrics: float(metrics[name])


READ_TRIES = 5  # a checkpoint read that fails transiently, tried this many times in all
READ_RETRY_WAIT = 2.0  # seconds before the second try; doubling after
# Words in the errors of storage that may answer on the next try (gRPC / HTTP / OS).
TRANSIENT_MARKERS = (
  "UNAVAILABLE",
  "DEADLINE_EXCEEDED",
  "RESOURCE_EXHAUSTED",
  "Service Unavailable",
  "Too Many Requests",
  "Connection reset",
  "Connection aborted",
  "timed out",
  "Temporary failure",
)


# How a process's read of one checkpoint went (shared between processes; the worst wins).
READ, DAMAGED, TRANSIENT, FAILED = 0, 1, 2, 3


class TransientReadError(RuntimeError):
  """A checkpoint read kept failing with a transient error: not damage."""


def _chain(error: BaseException):
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def transient(error: BaseException) -> bool:
  """Whether ``error`` (or one it was raised from) looks like storage that may answer
  on the next try, rather than a damaged checkpoint (memory running out is neither)."""
  for e in _chain(error):
    if isinstance(e, MemoryError) or "memory" in str(e).lower():
      return False
    if isinstance(e, (TimeoutError, ConnectionError)):
      return True
    if any(marker in str(e) for marker in TRANSIENT_MARKERS):
      return True
  return False


def damage(error: BaseException) -> bool:
  """Whether ``error`` is taken to say a checkpoint's files are damaged (missing,
  truncated, undecodable: tensorstore and Orbax report these as ValueError, OSError or
  AssertionError, among others): any error but a transient one or memory running out."""
  return not transient(error) and not any(isinstance(e, MemoryError) for e in _chain(error))


def _key_name(key) -> str:
  for attribute in ("key", "idx", "name"):  # DictKey, SequenceKey, GetAttrKey
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def tree_shapes(tree) -> dict:
  """{"params/student/...": shape} for the arrays of a state, abstract or saved (a
  checkpoint's metadata tree, where a namedtuple's fields come back as dict keys)."""
  leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
  return {
    "/".join(_key_name(k) for k in path): tuple(leaf.shape)
    for path, leaf in leaves
    if hasattr(leaf, "shape")
  }


class _Manager(ocp.CheckpointManager):
  """Orbax's manager, kept off JAX's preemption sync counter.

  Orbax asks ``reached_preemption(step)`` as it saves, also from its background
  finalize thread, and that passes the step number to JAX's
  ``reached_preemption_sync_point``. JAX keeps one counter per process, the last call's,
  and the train loop counts its own calls there (``train._Preemption``). A call of
  orbax's between two of the loop's set the counter back; when a SIGTERM came then,
  the agreed sync point could fall on a count no later call passed, and every process
  trained on instead of stopping. The loop decides when to stop and saves with
  ``force=True``, so orbax is told no preemption was reached.
  """

  def reached_preemption(self, step: int) -> bool:
    return False


class RunCheckpoints:
  """Save and restore a training run's checkpoints in ``workdir``."""

  def __init__(
    self,
    workdir: str,
    keep: int = 3,
    best_metric: str = "val_miou",
    best_mode: str = "max",
    async_save: bool = True,
  ):
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    self.directory = storage.join(workdir, CHECKPOINT_DIR)  # gs://... stays a URI
    self.best_metric = best_metric
    self.best_mode = best_mode
    policy = policies.AnyPreservationPolicy(
      [
        policies.LatestN(n=max(int(keep), 1)),
        policies.BestN(
          get_metric_fn=_metric_fn(best_metric),
          reverse=best_mode == "min",
          n=1,
          keep_checkpoints_without_metrics=False,
        ),
      ]
    )
    # best_fn makes the manager store each save's metrics; the policy decides deletion.
    options = ocp.CheckpointManagerOptions(
      preservation_policy=policy,
      create=True,
      best_fn=_metric_fn(best_metric),
      best_mode=best_mode,
      enable_async_checkpointing=async_save,
    )
    self.manager = _Manager(
      self.directory,
      options=options,
      item_handlers={
        "state": ocp.StandardCheckpointHandler(),
        "data": DataStateHandler(),
        "config": ocp.JsonCheckpointHandler(),
      },
    )

  def save(
    self,
    step: int,
    state: dict,
    data_iterator,
    config,
    metrics: Optional[dict] = None,
    force: bool = False,
  ) -> bool:
    items = {
      "state": ocp.args.StandardSave(state),
      "config": ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
    }
    if data_iterator is not None:
      items["data"] = DataSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)

  def steps(self):
    return sorted(self.manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def best_step(self) -> Optional[int]:
    """The step with the best ``best_metric`` among saved ones (None if none scored)."""
    return self.manager.best_step()

  def saved_shapes(self) -> Optional[dict]:
    """{"params/student/...": shape} of the newest checkpoint's state, from its
    metadata; None when there is none, or its metadata cannot be read (restore
    then names it)."""
    step = self.latest_step()
    if step is None:
      return None
    try:
      metadata = self.manager.item_metadata(step)["state"]
    except Exception:  # a damaged newest checkpoint: restore() falls back past it
      return None
    return tree_shapes(metadata)

  def restore(self, abstract_state, data_iterator=None, sleep=time.sleep):
    """(state, step) from the newest checkpoint every process can read, or (None, None)
    when the workdir holds none.

    ``abstract_state`` gives structure, shapes and shardings (ShapeDtypeStructs
    with ``sharding``); ``data_iterator`` is restored in place. Each process reads
    on its own (no barrier inside the read, so one that fails cannot leave the others
    waiting), then all of them share how it went:

    - read everywhere: restored;
    - damaged somewhere (``damage``: a truncated, missing or undecodable file): every
      process falls back to the previous step together (process 0's list of steps),
      and the damaged directory is set aside (``<step>.damaged``) so the run's later
      save of that step does not collide with it;
    - a transient error (``transient``) is retried first, READ_TRIES times in all with
      doubling waits; if it persists, or any other error, every process stops: neither
      is taken for damage.

    When checkpoints exist but none can be read, it raises: a workdir is never
    silently started afresh.
    """
    steps = distributed.chief_ints(self.steps())
    damaged = []
    for step in reversed(steps):
      path = storage.join(self.directory, str(step))
      restored, error, outcome = None, None, READ
      try:
        restored = self._read(step, abstract_state, data_iterator, sleep)
      except TransientReadError as e:
        error, outcome = e, TRANSIENT
      except Exception as e:
        error, outcome = e, (DAMAGED if damage(e) else FAILED)
      outcomes = distributed.each_int(outcome)
      if max(outcomes) == READ:
        self._set_aside(damaged)
        return restored["state"], step
      if max(outcomes) > DAMAGED:  # transient or unknown: stop, everywhere
        if error is not None and outcome > DAMAGED:
          raise error
        raise RuntimeError(
          f"reading checkpoint {path} failed on process(es) "
          f"{[i for i, o in enumerate(outcomes) if o > DAMAGED]} (their output says why)"
        ) from error
      reason = (
        f"{type(error).__name__}: {str(error)[:300]}"
        if error is not None
        else f"damaged for process(es) {[i for i, o in enumerate(outcomes) if o == DAMAGED]}"
      )
      logging.warning("checkpoint %s cannot be restored (%s)", path, reason)
      print(
        f"warning: checkpoint {path} cannot be restored ({reason}); trying the previous one",
        flush=True,
      )
      damaged.append(step)
    if steps:
      raise UserError(
        f"none of the checkpoints in {self.directory} (steps "
        f"{', '.join(map(str, steps))}) can be restored (the warnings above say why); "
        "the run was not started afresh over them. Move them away, or give this run "
        "another --workdir."
      )
    return None, None

  def _read_once(self, step, abstract_state, data_iterator):
    """One checkpoint's items, read by this process alone (the handlers, without the
    manager's barrier)."""
    path = epath.Path(self.directory) / str(step)
    state = ocp.StandardCheckpointHandler().restore(
      path / "state", args=ocp.args.StandardRestore(abstract_state)
    )
    if data_iterator is not None:
      DataStateHandler().restore(path / "data", args=DataRestore(data_iterator))
    return {"state": state}

  def _read(self, step, abstract_state, data_iterator, sleep):
    """One checkpoint, read with retries on transient errors."""
    for attempt in range(READ_TRIES):
      try:
        return self._read_once(step, abstract_state, data_iterator)
      except Exception as e:
        if not transient(e):
          raise
        path = storage.join(self.directory, str(step))
        if attempt == READ_TRIES - 1:
          raise TransientReadError(
            f"reading checkpoint {path} failed {READ_TRIES} times with a transient "
            f"error ({type(e).__name__}: {str(e)[:300]}); not taken for damage: start the "
            "run again when the storage answers"
          ) from e
        wait = READ_RETRY_WAIT * 2**attempt
        print(
          f"warning: reading {path} failed ({type(e).__name__}: {str(e)[:200]}); trying "
          f"again in {wait:.0f} s ({attempt + 2} of {READ_TRIES})",
          flush=True,
        )
        sleep(wait)

  def _set_aside(self, steps):
    """Renames damaged step directories to ``<step>.damaged`` (``.damaged-2`` ... when
    that exists; process 0), kept for a look, out of the way of the run's later saves.
    A rename that fails is reported; every process reaches the barrier either way."""
    if not steps:
      return
    if jax.process_index() == 0:
      for step in steps:
        path = epath.Path(storage.join(self.directory, str(step)))
        target, n = epath.Path(storage.join(self.directory, f"{step}.damaged")), 1
        while target.exists():
          n += 1
          target = epath.Path(storage.join(self.directory, f"{step}.damaged-{n}"))
        try:
          path.rename(target)
          print(f"moved the damaged checkpoint {path} to {target}", flush=True)
        except Exception as e:  # the run's save of this step will name the collision
          print(f"warning: could not move {path} aside ({type(e).__name__}: {e})", flush=True)
    distributed.barrier("checkpoint:set_aside")
    self.manager.reload()

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


ROLES = ("student", "teacher")  # where a train state keeps the model it trains


def trained_role(params) -> str:
  """The key of a train state's params that holds the trained model."""
  found = [r for r in ROLES if r in params]
  if len(found) != 1:
    raise UserError(f"a train state should hold exactly one of {ROLES}; it holds {sorted(params)}")
  return found[0]


def has_checkpoints(workdir: str) -> bool:
  return storage.isdir(storage.join(workdir, CHECKPOINT_DIR))


def restore_model_variables(path: str, what: str, with_source: bool = False):
  """{"params", "batch_stats"} of a trained model from an Orbax directory.

  ``path`` is either a directory ``transkd_jax.convert`` wrote, or a training
  run's workdir (its best checkpoint, else its latest; the model the run
  trained: its student, or a teacher run's teacher). ``what`` names the config key, for
  error messages.
  ``with_source=True`` returns (variables, a line naming the checkpoint read).
  """
  if not path:
    raise UserError(f"{what} is not set")
  path = storage.resolve(path)
  if not storage.isdir(path):
    raise UserError(
      f"{what}={path!r}: no such directory (expected an Orbax checkpoint "
      "written by transkd_jax.convert, or a training run's workdir)"
    )
  run_dir = storage.join(path, CHECKPOINT_DIR)
  try:
    if has_checkpoints(path):
      run = RunCheckpoints(path, async_save=False)
      step = run.best_step()
      step = run.latest_step() if step is None else step
      if step is None:
        raise UserError(f"{what}={path!r}: the run's {CHECKPOINT_DIR}/ holds no checkpoint")
      how = "best by " + run.best_metric if step == run.best_step() else "latest"
      run.close()
      variables = restore_trained_variables(storage.join(run_dir, str(step), "state"))
      source = f"{storage.join(run_dir, str(step))} (step {step}, {how})"
      return (variables, source) if with_source else variables
    tree = restore_pytree(path)
  except UserError:
    raise
  except Exception as e:
    raise UserError(
      f"{what}={path!r} cannot be read as an Orbax checkpoint ({type(e).__name__}: {str(e)[:300]})"
    ) from None
  if not isinstance(tree, dict) or "params" not in tree:
    raise UserError(
      f"{what}={path!r} holds no 'params' (expected the pytree "
      "{'params', 'batch_stats'} that transkd_jax.convert writes)"
    )
  variables = {"params": tree["params"], "batch_stats": tree.get("batch_stats", {})}
  return (variables, path) if with_source else variables


def _on_first_device(metadata):
  here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), metadata)


def restore_pytree(path: str):
  """A pytree saved with Orbax's standard handler, onto this process's first device.

  Works whatever the topology that wrote it (e.g. a teacher trained on 8
  devices or 2 processes, read by a 1-device evaluation).
  """
  metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(path))
  return ocp.StandardCheckpointer().restore(path, _on_first_device(metadata))


def restore_trained_variables(path: str) -> dict:
  """{"params", "batch_stats"} of the model a saved train state trains (its ``state`` item).

  Only those arrays are read (an Orbax partial restore): not the optimiser's
  moments, nor the training-time modules' parameters.
  """
  metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(path))
  role = trained_role(metadata["params"])
  stats = metadata["batch_stats"] if "batch_stats" in metadata else {}
  wanted = {"params": {role: metadata["params"][role]}}
  if role in stats and jax.tree.leaves(stats[role]):
    wanted["batch_stats"] = {role: stats[role]}
  target = _on_first_device(wanted)
  restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target)
  with ocp.PyTreeCheckpointer() as checkpointer:
    tree = checkpointer.restore(
      path, args=ocp.args.PyTreeRestore(target, restore_args=restore_args, partial_restore=True)
    )
  return {"params": tree["params"][role], "batch_stats": tree.get("batch_stats", {}).get(role, {})}


def saved_config(path: str, source: str = "") -> Optional[dict]:
  """A run workdir's saved config (JSON): the step named in ``source`` first, else the newest;
  None when ``path`` holds no run checkpoints."""
  directory = storage.join(path, CHECKPOINT_DIR)
  if not storage.isdir(directory):
    return None
  steps = sorted(
    (int(p.name) for p in epath.Path(directory).iterdir() if p.name.isdigit()), reverse=True
  )
  match = re.search(rf"{CHECKPOINT_DIR}/(\d+)", source)
  if match:
    steps.insert(0, int(match.group(1)))
  for step in steps:
    for file in sorted(epath.Path(directory, str(step), "config").glob("*")):
      try:
        config = json.loads(file.read_text())
      except (OSError, ValueError):
        continue
      if isinstance(config, dict):
        return config
  return None


def convert_record(path: str) -> Optional[dict]:
  """The record ``transkd_jax.convert`` writes beside its checkpoint (CONVERT_RECORD), or None."""
  record = storage.join(path, CONVERT_RECORD)
  if not storage.exists(record):
    return None
  try:
    value = json.loads(storage.read_text(record))
  except (OSError, ValueError):
    return None
  return value if isinstance(value, dict) else None


def recorded_normalization(path: str, source: str = ""):
  """(normalisation, where it was read) that the checkpoint at ``path`` expects, or
  (None, "nothing recorded"): a run's saved config, else convert's record."""
  return normalization.recorded(saved_config(path, source), convert_record(path), CONVERT_RECORD)


def check_variables(variables: dict, expected: Any, what: str, description: str):
  """Raises UserError listing key paths whose presence or shape differs."""

  def flat(tree):
    return {
      jax.tree_util.keystr(p): tuple(x.shape)
      for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }

  got, want = flat(variables), flat(expected)
  problems = [
    f"shape of {k}: {got[k]}, expected {want[k]}"
    for k in sorted(set(got) & set(want))
    if got[k] != want[k]
  ]
  problems += [f"missing {k} {want[k]}" for k in sorted(set(want) - set(got))]
  problems += [f"unexpected {k} {got[k]}" for k in sorted(set(got) - set(want))]
  if problems:
    shown = "; ".join(problems[:8]) + (
      f"; ... ({len(problems)} in all)" if len(problems) > 8 else ""
    )
    raise UserError(f"{what} does not fit {description}: {shown}")
