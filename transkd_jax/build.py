"""From a validated config to the objects a run uses: the one construction path.

Training, evaluation, prediction, the benchmarks and the tests all build here:

    method = build.method_of(config)          # the Method row; method.trains is the role
    run = build.training(config)              # models, mesh, teacher weights, state, steps
    served = build.serving(config, workdir)   # a SegFormer, its weights, the mesh, eval step

``config`` has been through ``config.validate_config`` (main does that once),
so keys are read as attributes here and nowhere gets a default again.
"""

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from transkd_jax import checkpoint as ckpt_lib
from transkd_jax import normalization, sharding
from transkd_jax.data.transforms import quarter_size
from transkd_jax.distill import Distiller, Method, check_pairing, get_method, loss_settings
from transkd_jax.errors import UserError
from transkd_jax.eval_step import make_eval_step as _make_eval_step
from transkd_jax.models import archs
from transkd_jax.models import kernels as kernels_lib
from transkd_jax.optim import make_optimizer
from transkd_jax.train_step import TrainState, init_state, jit_train_step, make_train_step


def method_of(config) -> Method:
  return get_method(config.method)


def mesh_of(config, devices=None):
  """The ("data", "model") mesh of ``config.mesh_shape`` over ``devices`` (default: all)."""
  try:
    return sharding.make_mesh(tuple(config.mesh_shape), devices)
  except ValueError as e:
    raise UserError(str(e)) from None


def kernels_of(config, mesh) -> str:
  """The kernel form for the mesh's devices (``config.kernels``; "auto" follows the platform).

  The devices the program is compiled for decide, not ``jax.default_backend()``:
  a mesh of TPU devices from a topology description gets the tpu form; NVIDIA GPUs
  get the gpu form (cuDNN's flash attention) from compute capability 8.0 on.
  """
  try:
    return kernels_lib.resolve_for(config.kernels, mesh.devices.flat[0])
  except ValueError as e:  # a form these devices lack: one line, not a traceback
    raise UserError(str(e)) from None


def trained_arch(config) -> str:
  """The model family a run trains and deploys (``config.<role>.arch``)."""
  return config[method_of(config).trains].arch


def trained_variant(config):
  """The variant a run trains and deploys (``config.eval.variant`` when set)."""
  return config.eval.variant or config[method_of(config).trains].variant


def distiller(config, kernels: str = "native") -> Distiller:
  """The trained model of ``config`` plus its method's training-time modules."""
  method = method_of(config)
  d = config.distill
  return Distiller(
    method,
    config[method.trains].variant,
    config.teacher.variant,
    arch=config[method.trains].arch,
    teacher_arch=config.teacher.arch,
    num_classes=config.num_classes,
    fusion_channels=d.fusion_channels,
    gl_heads=d.gl_heads,
    gl_residual=d.gl_residual,
    gl_mix_init=tuple(d.gl_mix_init),
    kernels=kernels,
    dtype=jnp.dtype(config.dtype),
    remat=config.remat,
  )


def teacher_model(config, kernels: str = "native"):
  """The frozen teacher, or None when the method distils nothing."""
  if method_of(config).teacher_call is None:
    return None
  return archs.build(
    config.teacher.arch,
    config.teacher.variant,
    config.num_classes,
    kernels=kernels,
    dtype=jnp.dtype(config.teacher_dtype or config.dtype),
  )


def read_model(path: str, what: str, arch: str, variant, num_classes: int):
  """(variables, source): a model's weights as host arrays, checked against its shape.

  ``path`` is a ``transkd_jax.convert`` output or a run's workdir; ``what``
  names the config key or flag it came from, for errors.
  """
  variables, source = ckpt_lib.restore_model_variables(path, what, with_source=True)
  model = archs.build(arch, variant, num_classes)
  expected = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  ckpt_lib.check_variables(
    variables,
    {"params": expected["params"], "batch_stats": expected.get("batch_stats", {})},
    f"{what}={path}",
    f"{archs.model_name(arch, variant)} with {num_classes} classes "
    "(config.teacher.arch/variant / config.student.arch/variant / config.eval.variant and "
    "config.num_classes)",
  )
  # Only the model's own collections: PVTv2 has no batch_stats (convert writes an empty one).
  variables = {name: variables[name] for name in expected}
  return jax.tree.map(np.asarray, variables), source


def deployed_model(config, kernels: str = "native"):
  """The model a run trains and deploys (eval, predict, export)."""
  return archs.build(
    trained_arch(config),
    trained_variant(config),
    config.num_classes,
    kernels=kernels,
    dtype=jnp.dtype(config.dtype),
  )


def make_eval_step(config, mesh, protocol: Optional[str] = None, input_norm=None):
  """The jitted evaluation step of the run's deployed model (``config.eval_protocol``).

  ``input_norm``: (the pipeline's normalisation, the weights'), as ``Serving.input_norm``;
  ``None``: both are the pipeline's (``config.data.transforms``).
  """
  if input_norm is None:
    input_norm = (normalization.of_transforms(config.data.transforms),) * 2
  return _make_eval_step(
    deployed_model(config, kernels_of(config, mesh)),
    config.num_classes,
    protocol or config.eval_protocol,
    mesh,
    input_norm,
  )


def batch_spec(config, mesh=None) -> dict:
  """The train step's batch as ShapeDtypeStructs (split along ``data`` when ``mesh`` is given).

  Images are uint8 pixels N x H x W x 3 (normalised in the step); labels int32 at a quarter
  of the input under the reference and aligned transforms (the logits' resolution), at the
  input's size under mmseg's.
  """
  height, width = config.image_size
  label = (height, width) if config.data.transforms == "mmseg" else quarter_size((height, width))
  placed = {} if mesh is None else {"sharding": sharding.batch_sharding(mesh)}
  return {
    "image": jax.ShapeDtypeStruct((config.batch_size, height, width, 3), jnp.uint8, **placed),
    "label": jax.ShapeDtypeStruct((config.batch_size, *label), jnp.int32, **placed),
  }


@dataclasses.dataclass
class Teacher:
  """The frozen teacher of a distillation run, as one value."""

  model: Any  # its flax module
  abstract: dict  # its variables as ShapeDtypeStructs carrying their shardings
  init: Callable[[], dict]  # random variables from config.seed + 1 (benchmarks, tests)
  variables: Optional[dict]  # the checkpoint's, placed on the mesh (None: weights=False)
  source: str  # the checkpoint read ("" when none was)
  input_norm: str  # the normalisation its weights expect ("unit" | "imagenet")
  input_norm_source: str  # where that came from, for the log

  @property
  def shardings(self):
    return jax.tree.map(lambda x: x.sharding, self.abstract)

  def random_variables(self) -> dict:
    """Variables from ``config.seed + 1``, placed on the mesh (benchmarks, tests)."""
    return jax.jit(self.init, out_shardings=self.shardings)()


@dataclasses.dataclass
class Training:
  """Everything a training run (or a step benchmark) needs, built from one config."""

  config: Any
  method: Method
  model: Distiller
  teacher: Optional[Teacher]  # None when the method distils nothing
  mesh: Any
  kernels: str  # the resolved kernel form ("cpu" | "native" | "tpu")
  optimizer: Any
  schedule: Callable
  init: Callable[[], TrainState]  # a fresh state (student init applied)
  abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings
  train_step: Callable  # jitted: (state, teacher variables or None, batch)
  eval_step: Callable  # jitted: (variables, batch)

  @property
  def state_shardings(self):
    return jax.tree.map(lambda x: x.sharding, self.abstract_state)

  def new_state(self) -> TrainState:
    return jax.jit(self.init, out_shardings=self.state_shardings)()

  def teacher_variables(self, random: bool = False) -> Optional[dict]:
    """The teacher's variables for the train step: the checkpoint's, or with ``random``
    (benchmarks, compiles, tests) fresh ones; None without a teacher."""
    if self.teacher is None:
      return None
    return self.teacher.random_variables() if random else self.teacher.variables

  def deployed(self, state: TrainState) -> dict:
    """The trained model's variables out of a train state."""
    role = self.method.trains
    return {"params": state.params[role], "batch_stats": state.batch_stats.get(role, {})}


def _placed(abstract, mesh, rule: str):
  """``abstract`` (ShapeDtypeStructs) carrying the shardings ``rule`` gives them on ``mesh``."""
  shardings = sharding.tree_shardings(abstract, mesh, rule)
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
  )


def teacher_of(config, model: Distiller, mesh, kernels: str, weights: bool) -> Optional[Teacher]:
  """The frozen teacher of ``config`` on ``mesh``; with ``weights``, its checkpoint read,
  checked against the trained model, and placed (before anything compiles)."""
  module = teacher_model(config, kernels)
  if module is None:
    return None
  size = tuple(config.image_size)
  images = jnp.zeros((1, *size, 3), jnp.float32)

  def init():
    return module.init(jax.random.key(config.seed + 1), images)

  abstract = _placed(jax.eval_shape(init), mesh, config.sharding)
  variables, source = None, ""
  if weights:
    if not config.teacher.checkpoint:
      raise UserError(
        f"method {config.method!r} distils from a teacher: set "
        "config.teacher.checkpoint to an Orbax directory (transkd_jax.convert's "
        "output, or the workdir of a --config.method=teacher run)"
      )
    host, source = read_model(
      config.teacher.checkpoint,
      "config.teacher.checkpoint",
      config.teacher.arch,
      config.teacher.variant,
      config.num_classes,
    )
    try:
      check_pairing(model, module, size)
    except ValueError as e:
      raise UserError(f"teacher and student do not pair: {e}") from None
    variables = sharding.put_global(host, jax.tree.map(lambda x: x.sharding, abstract))
  norm, norm_source = input_normalization(
    config,
    config.teacher.input_norm,
    "config.teacher.input_norm",
    config.teacher.checkpoint if weights else "",
    source,
  )
  return Teacher(module, abstract, init, variables, source, norm, norm_source)


def training(config, weights: bool = True, devices=None) -> Training:
  """Builds the run of ``config``; the teacher is read and checked before anything compiles.

  ``weights=False`` (benchmarks, compiles) reads no checkpoint and runs
  nothing: the teacher has no ``variables`` (``teacher_variables(random=True)``
  makes some) and the trained model starts from ``config.seed``. ``devices``
  (default: all of this process's run) are those the mesh spans; they may be a
  TPU topology's devices, for compiling only (``bench/compile.py``).
  """
  method = method_of(config)
  mesh = mesh_of(config, devices)
  kernels = kernels_of(config, mesh)
  model = distiller(config, kernels)
  size = tuple(config.image_size)
  role = config[method.trains]
  initial = None
  if weights and role.init:
    initial, _ = read_model(
      role.init, f"config.{method.trains}.init", role.arch, role.variant, config.num_classes
    )
  teacher = teacher_of(config, model, mesh, kernels, weights)
  check_batch_size(config, mesh)
  optimizer, schedule = make_optimizer(config.optimizer, config.total_steps)

  def init():
    return init_state(model, optimizer, size, config.seed, initial)

  abstract = _placed(jax.eval_shape(init), mesh, config.sharding)
  shardings = jax.tree.map(lambda x: x.sharding, abstract)
  student_norm = normalization.of_transforms(config.data.transforms)
  step = make_train_step(
    model,
    None if teacher is None else teacher.model,
    method,
    loss_settings(method, config.distill),
    optimizer,
    schedule,
    config.seed,
    tuple(config.class_weights) or None,
    mesh,
    teacher_input=(student_norm, student_norm if teacher is None else teacher.input_norm),
    param_shardings=shardings.params,
    grad_accum_steps=config.grad_accum_steps,
  )
  teacher_shardings = None if teacher is None else teacher.shardings
  train_step = jit_train_step(step, mesh, shardings, teacher_shardings)
  eval_step = make_eval_step(config, mesh)
  parts = (model, teacher, mesh, kernels, optimizer, schedule, init, abstract)
  return Training(config, method, *parts, train_step, eval_step)


def input_normalization(config, chosen: str, what: str, path: str = "", source: str = ""):
  """(the input normalisation a checkpoint's weights expect, where that came from).

  ``chosen`` (a config key's value, named ``what``) when set; else what the checkpoint
  at ``path`` records (transkd_jax/normalization.py; ``source`` names the step read);
  else ``config.data.transforms``' own.
  """
  if chosen:
    return chosen, what
  if path:
    recorded, why = ckpt_lib.recorded_normalization(path, source)
    if recorded is not None:
      return recorded, f"{why}, at {path}"
  return (
    normalization.of_transforms(config.data.transforms),
    f"config.data.transforms={config.data.transforms!r}",
  )


def check_batch_size(config, mesh):
  if config.per_device_batch_size:  # main turns it into the global batch at start-up
    raise UserError(
      f"config.per_device_batch_size={config.per_device_batch_size} is unresolved: call "
      "transkd_jax.config.resolve_batch_size(config, jax.device_count()) first"
    )
  processes = len({d.process_index for d in mesh.devices.flat})
  k = config.grad_accum_steps
  if k > 1 and (config.batch_size % k or (config.batch_size // k) % mesh.size):
    raise UserError(
      f"config.grad_accum_steps={k}: the batch of {config.batch_size} must split into {k} "
      f"micro-batches that divide evenly over the mesh's {mesh.size} devices (a multiple "
      f"of {k * mesh.size})"
    )
  if config.batch_size % mesh.size or config.batch_size % processes:
    raise UserError(
      f"config.batch_size={config.batch_size} must divide evenly over the "
      f"mesh's {mesh.size} devices (batches are split over all of them) and "
      f"{processes} processes; or set a batch per device instead: "
      "--config.per_device_batch_size=2 --config.batch_size=0"
    )


@dataclasses.dataclass
class Serving:
  """A trained model for eval and predict: model, weights, where they came from."""

  model: Any
  variables: dict  # host arrays (numpy)
  source: str
  mesh: Any
  variant: Any
  input_norm: tuple  # (the pipeline's normalisation, the weights')
  input_norm_source: str


def serving(config, workdir: str) -> Serving:
  """The weights of ``config.eval.checkpoint``, else of ``workdir``'s best checkpoint."""
  path, what = config.eval.checkpoint, "config.eval.checkpoint"
  if not path:
    path, what = workdir, "--workdir"
    if not ckpt_lib.has_checkpoints(workdir):
      raise UserError(
        f"--workdir={workdir} holds no {ckpt_lib.CHECKPOINT_DIR}/: train there "
        "first, or set config.eval.checkpoint to a run's workdir or a converted "
        "checkpoint"
      )
  variant = trained_variant(config)
  variables, source = read_model(path, what, trained_arch(config), variant, config.num_classes)
  mesh = mesh_of(config)
  norm, why = input_normalization(
    config, config.eval.input_norm, "config.eval.input_norm", path, source
  )
  return Serving(
    deployed_model(config, kernels_of(config, mesh)),
    variables,
    source,
    mesh,
    variant,
    (normalization.of_transforms(config.data.transforms), norm),
    why,
  )
