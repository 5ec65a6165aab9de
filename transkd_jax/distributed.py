"""Multi-process start-up: ``jax.distributed.initialize`` when the run spans processes.

- Explicit: ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``
  (e.g. ``launch/local_multiprocess.sh``: N CPU processes on 127.0.0.1, gloo).
- ``--distributed=on``: ``jax.distributed.initialize()`` with no arguments;
  JAX finds the cluster itself: a Cloud TPU VM slice made with ``gcloud compute
  tpus tpu-vm create`` (from the VM metadata server: ``launch/tpu_pod.sh``
  passes this flag), GKE, SLURM, Open MPI.
- ``--distributed=auto`` (the default): as ``on`` when the environment shows
  several processes without asking a server: SLURM with more than one task,
  or a TPU slice whose workers are listed in ``TPU_WORKER_HOSTNAMES`` /
  ``TPU_PROCESS_ADDRESSES`` (GKE, or set by hand). A plain TPU VM slice sets
  neither, which is why ``tpu_pod.sh`` says ``on``.
- ``--distributed=off``, or nothing detected: one process; nothing is initialised.

After start-up every process runs the same program: each reads its part of
every global batch (transkd_jax/data/pipeline.py), the step's collectives
cross processes (gloo on CPU, NCCL on GPU, ICI on TPU), only process 0 writes
logs, TensorBoard files and predictions, and Orbax writes checkpoints from all
of them together. A process that dies stops sending heartbeats; after
``heartbeat_timeout`` seconds the others stop with an error instead of waiting
in a collective forever.
"""

import os
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import flags

DEFAULT_HEARTBEAT_TIMEOUT = 100  # seconds; JAX's default


MODES = ("auto", "on", "off")


def _cluster_detected() -> bool:
  if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in os.environ:
    return True
  hosts = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES") or ""
  return "," in hosts  # a TPU pod slice lists several workers


def initialize(
  coordinator_address: Optional[str] = None,
  num_processes: Optional[int] = None,
  process_id: Optional[int] = None,
  heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT,
  mode: str = "auto",
) -> bool:
  """Initialises JAX's multi-process runtime when needed; True if it did."""
  if heartbeat_timeout < 1:
    raise ValueError(f"--heartbeat_timeout={heartbeat_timeout} must be at least 1 second")
  if mode not in MODES:
    raise ValueError(f"--distributed={mode!r} must be one of {', '.join(MODES)}")
  explicit = (coordinator_address, num_processes, process_id)
  if mode == "off":
    if any(v is not None for v in explicit):
      raise ValueError(
        "--distributed=off contradicts --coordinator_address / --num_processes / --process_id"
      )
    return False
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError(
        "--coordinator_address, --num_processes and --process_id go together; "
        f"got {coordinator_address!r}, {num_processes!r}, {process_id!r}"
      )
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
    if num_processes == 1:
      return False
    _start(
      coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
      heartbeat_timeout_seconds=heartbeat_timeout,
    )
    return True
  if mode == "on" or _cluster_detected():
    _start(heartbeat_timeout_seconds=heartbeat_timeout)
    return True
  return False


BARRIER_TIMEOUT = 1800  # seconds: processes may differ by a whole compile or data set-up


def barrier(name: str, timeout: int = BARRIER_TIMEOUT):
  """Waits until every process reaches ``name`` (no-op with one process).

  Goes through the coordination service, which waits ``timeout`` seconds;
  gloo's first collective gives up after 30 s, so every process passes a
  barrier before the first collective (checkpoint set-up, the first step).
  """
  if jax.process_count() > 1:
    ocp.multihost.get_barrier_sync_fn()(key=f"transkd_jax:{name}", timeout_ms=timeout * 1000)


def _start(*args, **kwargs):
  # CPU processes exchange collectives through gloo (JAX's default; set so that a
  # changed default cannot silently leave CPU runs without cross-process collectives).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # Orbax's own barriers through the coordination service too (they wait; gloo does not).
  if "experimental_orbax_use_distributed_barrier" in flags.FLAGS:
    flags.FLAGS.experimental_orbax_use_distributed_barrier = True
  jax.distributed.initialize(*args, **kwargs)
  print(
    f"process {jax.process_index()} of {jax.process_count()}: "
    f"{jax.local_device_count()} local of {jax.device_count()} devices "
    f"({jax.devices()[0].platform})",
    flush=True,
  )


def each_int(value: int) -> list:
  """Every process's ``value``, in process order (a collective: every process calls it)."""
  if jax.process_count() == 1:
    return [int(value)]
  from jax.experimental import multihost_utils

  return [int(v) for v in multihost_utils.process_allgather(np.asarray(value, np.int32))]


def chief_ints(values, size: int = 256) -> list:
  """Process 0's list of up to ``size`` non-negative integers, on every process."""
  if jax.process_count() == 1:
    return list(values)
  from jax.experimental import multihost_utils

  padded = np.full(size, -1, np.int64)
  values = list(values)[-size:]
  padded[: len(values)] = values
  return [int(v) for v in multihost_utils.broadcast_one_to_all(padded) if v >= 0]
