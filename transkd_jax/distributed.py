"""Multi-process start-up: ``jax.distributed.initialize`` when the run spans processes.

- Explicit: ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``
  (e.g. ``launch/local_multiprocess.sh``: N CPU processes on 127.0.0.1, gloo).
- Automatic: on TPU pods and under SLURM with more than one task, JAX finds
  the cluster from the environment.
- Otherwise one process; nothing is initialised.
"""

import os
from typing import Optional

import jax


def _cluster_detected() -> bool:
  if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in os.environ:
    return True
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hosts  # a TPU pod slice lists several workers


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> bool:
  """Initialises JAX's multi-process runtime when needed; True if it did."""
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError("--coordinator_address, --num_processes and --process_id go together; "
                       f"got {coordinator_address!r}, {num_processes!r}, {process_id!r}")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in [0, --num_processes="
                       f"{num_processes})")
    if num_processes == 1:
      return False
    jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return True
  if _cluster_detected():
    jax.distributed.initialize()
    return True
  return False
