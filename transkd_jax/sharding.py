"""The device mesh and how arrays are laid out on it.

The mesh has two axes, ``data`` and ``model`` (``config.mesh_shape``, e.g.
(-1, 1): every device on ``data``). Batches are split over every device of
the mesh (both axes: each device sees its own examples). Parameters and
optimiser state follow a named rule (``config.sharding``):

- ``replicate``: every device holds everything (plain data parallelism);
- ``fsdp``: large arrays are split along ``model`` on their largest dimension
  that divides evenly, small ones are replicated. The step gathers them whole
  for use and reduces their gradients back to the split layout
  (transkd_jax/train_step.py): ZeRO-3 / FSDP, with ``model`` a parameter axis
  and every device still data-parallel.

Rules look only at an array's shape, so the optimiser state (which mirrors the
parameters) is laid out like the parameters.
"""

import functools
import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "model")
FSDP_MIN_SIZE = 2**16  # arrays smaller than this stay replicated under "fsdp"


def make_mesh(mesh_shape: Sequence[int] = (-1, 1), devices=None) -> Mesh:
  """A ("data", "model") mesh; one -1 in ``mesh_shape`` takes the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(mesh_shape)
  if len(shape) != 2 or shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(
      f"config.mesh_shape must be (data, model) with at most one -1, got {tuple(mesh_shape)}"
    )
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if len(devices) % known:
      raise ValueError(
        f"config.mesh_shape {tuple(mesh_shape)} does not divide the {len(devices)} devices"
      )
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(
      f"config.mesh_shape {tuple(shape)} needs {math.prod(shape)} devices; there are {len(devices)}"
    )
  # jax.make_mesh orders the devices by the physical topology (ICI rings on TPU);
  # Auto axes: the program's sharding is propagated, not part of the types.
  return jax.make_mesh(tuple(shape), AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device (``data`` major, ``model`` minor)."""
  return NamedSharding(mesh, P(AXES))


def micro_batch_sharding(mesh: Mesh) -> NamedSharding:
  """(micro-batch, batch, ...): the second axis split as ``batch_sharding`` splits the first."""
  return NamedSharding(mesh, P(None, AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _replicate_spec(shape, mesh):
  return P()


def _fsdp_spec(shape, mesh):
  size = mesh.shape["model"]
  if size == 1 or math.prod(shape) < FSDP_MIN_SIZE:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % size == 0:
      spec = [None] * len(shape)
      spec[dim] = "model"
      return P(*spec)
  return P()


RULES = {"replicate": _replicate_spec, "fsdp": _fsdp_spec}


def tree_shardings(tree, mesh: Mesh, rule: str = "replicate"):
  """A NamedSharding per leaf of ``tree`` (arrays or ShapeDtypeStructs)."""
  if rule not in RULES:
    raise ValueError(f"config.sharding must be one of {', '.join(RULES)}, got {rule!r}")
  spec_of = RULES[rule]
  return jax.tree.map(lambda x: NamedSharding(mesh, spec_of(tuple(x.shape), mesh)), tree)


def put_global(tree, shardings):
  """Host values that every process holds alike -> global jax.Arrays laid out by ``shardings``.

  ``shardings`` is one sharding for every leaf or a tree of them. Each process
  places only its own devices' shards, so this works across processes, where
  ``jax.device_put`` of a single-device array would need cross-host transfers.
  """

  def put(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: put(x, shardings), tree)
  return jax.tree.map(put, tree, shardings)


def global_batch(local_batch, mesh: Mesh):
  """Host-local numpy batch -> global jax.Arrays split over the mesh's devices.

  Each process passes its own slice; ``jax.make_array_from_process_local_data``
  assembles the global batch (one process: the batch itself).
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
  )


def traced_on(mesh: Mesh, fn):
  """``fn``, traced with ``mesh`` as the context's abstract mesh. Kernels XLA cannot
  partition (the Pallas attention of transkd_jax/models/kernels.py, TPU only) find it
  there and ``shard_map`` themselves over it; everything else traces as it would without
  it. Every platform traces this way, so the CPU tests of several processes run the path
  a TPU slice runs."""

  @functools.wraps(fn)
  def traced(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)

  return traced
