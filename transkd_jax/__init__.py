"""transkd-jax: TransKD (arXiv 2202.13393) in JAX/Flax."""

import glob
import importlib.util
import os
import sys

__version__ = "0.1.0"


def _cpu_when_libtpu_has_no_tpu():
  """libtpu (installed by the ``tpu`` and ``test`` extras) initialises at every JAX start
  and, on a machine without a TPU, prints errors that read as failures ("Failed to find
  host bounds for accelerator type", "unexpected worker hostname"). With no TPU and no
  GPU here, JAX would run on the CPU anyway: it is asked for directly, unless
  ``JAX_PLATFORMS`` says otherwise. Compiling for a TPU topology (benchmark compile)
  does not need the TPU backend and keeps working."""
  if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
    return
  tpu = glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")
  gpu = glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd")
  if tpu or gpu or os.environ.get("TPU_ACCELERATOR_TYPE"):
    return
  os.environ["JAX_PLATFORMS"] = "cpu"
  if "jax" in sys.modules:  # imported before us: its config read the environment already
    sys.modules["jax"].config.update("jax_platforms", "cpu")


_cpu_when_libtpu_has_no_tpu()
