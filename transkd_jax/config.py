"""Every config key, with its default: what dataset configs (configs/*.py) start from.

Defaults are the public TransKD code's settings for Cityscapes (docs/transkd.md).
A config file calls ``base_config()`` and sets what differs for its dataset;
``python -m transkd_jax.main --config=configs/<name>.py --config.key=value``
overrides any key.
"""

import ml_collections

from transkd_jax.data import check_config as check_data_config
from transkd_jax.data import default_data_config
from transkd_jax.distill import get_method, loss_settings
from transkd_jax.errors import UserError
from transkd_jax.eval_step import PROTOCOLS
from transkd_jax.models import archs
from transkd_jax.models.base import REMAT_POLICIES
from transkd_jax.models.kernels import SETTINGS
from transkd_jax.pairs import pairs_of
from transkd_jax.sharding import RULES

STEPS_PER_EPOCH = 1488  # Cityscapes: 2975 training images, batch 2


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.num_classes = 19
  config.image_size = (512, 1024)  # (height, width) the models see

  # Models (transkd_jax/models/archs.py): arch "segformer" (variants b0-b5), "pvtv2"
  # (b0-b5: PVTv2 with the Semantic-FPN head) or "lvt" (variant "lvt"). Any teacher/student
  # pair whose four stage maps share strides distils: the distillation modules take
  # their widths from the two models' stage shapes.
  config.teacher = ml_collections.ConfigDict()
  config.teacher.arch = "segformer"
  config.teacher.variant = "b2"
  config.teacher.checkpoint = ""  # Orbax dir: transkd_jax.convert output or a teacher run
  config.teacher.init = ""  # for --config.method=teacher: a converted ImageNet MiT
  # The input normalisation the teacher expects ("unit": [0, 1] pixels, TransKD's teachers;
  # "imagenet": mean/std, official SegFormer / HuggingFace weights). Empty: what its
  # checkpoint records (transkd_jax.convert's record, or its run's data.transforms).
  config.teacher.input_norm = ""
  config.teacher.check_images = 50  # before distilling: the teacher's mIoU on this many val
  # images, printed (0: skip)

  config.student = ml_collections.ConfigDict()
  config.student.arch = "segformer"
  config.student.variant = "b0"
  config.student.init = ""  # empty: from scratch, as in TransKD

  config.dtype = "float32"  # compute dtype of the models; "bfloat16" on GPU/TPU
  # Compiled programs kept between starts (transkd_jax/compile_cache.py); "" turns it off.
  config.compile_cache = "~/.cache/transkd_jax/xla"
  config.teacher_dtype = "float32"  # the frozen teacher's compute dtype ("": config.dtype)
  # Kernel forms (transkd_jax/models/kernels.py): "auto" follows the devices the program is
  # compiled for (XLA:CPU forms on CPU, Pallas splash attention on TPU, cuDNN's flash
  # attention on NVIDIA GPUs of compute capability 8.0 or newer, else native ops);
  # "cpu" / "native" / "tpu" / "gpu" force one.
  config.kernels = "auto"

  # What to train (transkd_jax/distill/methods.py): student | transkd_base | transkd_gl |
  # transkd_ea | kd | cwd | reviewkd | fitnet, or teacher (the teacher alone).
  config.method = "transkd_base"
  config.class_weights = ()  # cross-entropy class weights (one per class); () for plain CE
  config.distill = ml_collections.ConfigDict()
  config.distill.hcl_weight = 1.0  # CSF / ReviewKD feature maps
  config.distill.pea_weights = (0.1, 0.1, 0.5, 1.0)  # patch embeddings, stages 1-4
  config.distill.fusion_channels = 64  # CSF / ABF middle width
  config.distill.gl_heads = 8  # GL-Mixer attention heads
  config.distill.gl_residual = False  # off in the published evaluation
  config.distill.gl_mix_init = (1.0, 1.0)  # GL-Mixer's a, b (public: uninitialised)
  config.distill.kd_weight = 0.5  # logit KD (public flags: alpha 0.5, tau 1)
  config.distill.kd_temperature = 1.0
  config.distill.cwd_weight = 1.0  # channel-wise distillation (public: 1, T 1)
  config.distill.cwd_temperature = 1.0
  config.distill.fitnet_weights = (1.0, 1.0, 1.0, 1.0)

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.lr = 6e-5
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 0.01
  config.optimizer.decay_power = 1.0
  config.optimizer.end_lr = 0.0
  config.optimizer.decay_steps = 1500 * STEPS_PER_EPOCH
  config.optimizer.warmup_steps = 0
  config.optimizer.grad_clip_norm = 0.0
  config.optimizer.no_decay_norms_biases = False

  # The batch: either global (batch_size, over all devices and processes) or per
  # device (per_device_batch_size; the global batch is it x the device count, set
  # at start-up). Exactly one of the two is non-zero.
  config.batch_size = 2
  config.per_device_batch_size = 0
  # Gradient accumulation: each update's batch runs as this many micro-batches in turn
  # (transkd_jax/train_step.py), so activations take a micro-batch's memory. The batch
  # above stays the update's; it must split into micro-batches that divide over devices.
  config.grad_accum_steps = 1
  # Activation rematerialisation of the trained model's encoder blocks (memory for
  # compute): "none", "block" (keep each block's input only) or "block_save_dots" (also
  # its matmul outputs); transkd_jax/models/base.py REMAT_POLICIES.
  config.remat = "none"
  config.total_steps = 1000 * STEPS_PER_EPOCH
  config.seed = 0
  config.log_every = 50
  config.profile_steps = ()  # (first, last): a jax.profiler trace of these
  # steps (as logged, from 1) in WORKDIR/profile
  config.count_flops = True  # TFLOP/s and MFU in the metrics (one more trace
  # of the step at start-up)
  config.eval_every = STEPS_PER_EPOCH  # validate once per epoch, as the public code
  config.checkpoint_every = 1000
  config.keep_checkpoints = 3  # latest N, plus the best by validation mIoU
  # Keys (comma-separated, e.g. "data.root,data.num_workers") that may differ from the
  # config a workdir's checkpoints were saved with; logging, evaluation, checkpoint and
  # length keys may always (transkd_jax/resume.py).
  config.resume_allow = ""
  config.train_split = "train"
  config.eval_split = "val"
  config.eval_protocol = "standard"  # mIoU: or "reference" (the public code's, 1/4 labels)
  config.mesh_shape = (-1, 1)  # (data, model); -1 takes the remaining devices
  config.sharding = "replicate"  # or "fsdp": large arrays split along "model"

  # --mode=eval and --mode=predict (transkd_jax/evaluate.py, transkd_jax/predict.py).
  config.eval = ml_collections.ConfigDict()
  config.eval.checkpoint = ""  # a run's workdir or an Orbax dir; empty: --workdir's best
  config.eval.variant = ""  # the variant to load (of the trained model's arch); empty:
  # the run's trained model
  config.eval.input_norm = ""  # what the weights expect ("unit" | "imagenet"); empty: what the
  # checkpoint records, else config.data.transforms' own
  config.predict = ml_collections.ConfigDict()
  config.predict.input = ""  # an image file, a directory (searched recursively) or a glob
  config.predict.output_dir = ""  # empty: WORKDIR/predictions
  config.predict.resize = True  # True: the model sees config.image_size; False: native size
  config.predict.cityscapes_format = False  # also write <name>_labelIds.png for the server
  config.predict.overlay_alpha = 0.5  # weight of the colour map in the overlay

  config.data = default_data_config()  # keys: transkd_jax/data/__init__.py

  # --mode=recipe (transkd_jax/recipe.py): the paper's table on one dataset.
  config.recipe = ml_collections.ConfigDict()
  config.recipe.methods = (
    "student",
    "transkd_base",
    "transkd_gl",
    "transkd_ea",
    "kd",
    "cwd",
    "reviewkd",
    "fitnet",
  )  # each trains the student for total_steps
  config.recipe.teacher_steps = 0  # the teacher's training steps; 0: config.total_steps
  # Each method's runs: seeds config.seed .. config.seed + seeds - 1 (one teacher for all);
  # results.md gives mean +- std.
  config.recipe.seeds = 1
  # Also the ablation's rows (recipe.ABLATION: + HCL, + CSF, + PEA, + GL-Mixer, + EA,
  # ReviewKD) and their section in results.md; the config's own pair only.
  config.recipe.ablation = False
  # The student-alone row's own budget (the public train_student.py: batch 4, 500 epochs;
  # configs/cityscapes.py and acdc.py set it). 0: the same as every other row.
  config.recipe.student_batch_size = 0  # 0: config.batch_size
  config.recipe.student_steps = 0  # 0: config.total_steps
  config.recipe.student_decay_steps = 0  # 0: config.optimizer.decay_steps
  # Several teacher/student pairs, each its own table: ("TEACHER>STUDENT", ...) with models
  # written ARCH-VARIANT, e.g. ("segformer-b2>segformer-b0", "pvtv2-b2>pvtv2-b0",
  # "segformer-b2>lvt"). Empty: config.teacher -> config.student only. Pairs other than
  # that one run pair_methods (empty: recipe.methods) for pair_steps (0: total_steps),
  # and their new teachers pair_teacher_steps (0: recipe.teacher_steps).
  config.recipe.pairs = ()
  config.recipe.pair_methods = ()
  config.recipe.pair_steps = 0
  config.recipe.pair_teacher_steps = 0
  return config


_DTYPES = ("float32", "bfloat16", "float16")


def _keys(tree, prefix=""):
  out = set()
  for key, value in tree.items():
    out.add(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      out |= _keys(value, f"{prefix}{key}.")
  return out


def _check(ok: bool, key: str, expected: str, value):
  if not ok:
    raise UserError(f"config.{key} must be {expected}, got {value!r}")


def _positive_int(config, key, allow_zero=False):
  value = config
  for part in key.split("."):
    value = value[part]
  ok = (
    isinstance(value, int)
    and not isinstance(value, bool)
    and (value >= 0 if allow_zero else value >= 1)
  )
  _check(ok, key, "a non-negative integer" if allow_zero else "a positive integer", value)


def _check_batch_size(config):
  for key in ("batch_size", "per_device_batch_size"):
    _positive_int(config, key, allow_zero=True)
  if (config.batch_size > 0) == (config.per_device_batch_size > 0):
    raise UserError(
      f"config.batch_size={config.batch_size} and config.per_device_batch_size="
      f"{config.per_device_batch_size}: set exactly one of them (the other 0), e.g. "
      "--config.batch_size=16 --config.per_device_batch_size=0 for a global batch of 16, "
      "or --config.per_device_batch_size=2 --config.batch_size=0 for 2 per device"
    )


def resolve_batch_size(config, device_count: int) -> str:
  """Sets ``config.batch_size`` to the global batch (from ``per_device_batch_size``
  when that is set, which becomes 0), and says where it came from. Idempotent."""
  per_device = config.per_device_batch_size
  if per_device:
    config.batch_size, config.per_device_batch_size = per_device * device_count, 0
    return f"global batch {config.batch_size} ({per_device} per device x {device_count} devices)"
  return f"global batch {config.batch_size} (config.batch_size) over {device_count} devices"


def validate_config(config):
  """Checks every key once, before anything is built; raises UserError naming the key.

  After this, code reads keys as attributes: every key ``base_config()``
  defines is present (a config file that does not start from it is named
  with the keys it lacks).
  """
  missing = sorted(_keys(base_config()) - _keys(config))
  if missing:
    raise UserError(
      f"the config lacks {', '.join('config.' + k for k in missing[:8])}"
      f"{' ...' if len(missing) > 8 else ''}: config files start from "
      "transkd_jax.config.base_config() (see configs/cityscapes.py)"
    )
  for role in ("teacher", "student"):
    try:
      archs.check_arch(config[role].arch)
    except ValueError as e:
      raise UserError(f"config.{role}.arch: {e}") from None
    try:
      archs.get_arch_variant(config[role].arch, config[role].variant)
    except ValueError as e:
      raise UserError(
        f"config.{role}.variant (config.{role}.arch={config[role].arch!r}): {e}"
      ) from None
  _positive_int(config, "num_classes")
  size = tuple(config.image_size)
  _check(
    len(size) == 2 and all(isinstance(s, int) and s >= 32 for s in size),
    "image_size",
    "(height, width), each an integer >= 32",
    size,
  )
  if config.dtype == "float16":  # the frozen teacher may run in it: it gets no gradients
    raise UserError(
      "config.dtype='float16': training in float16 needs loss scaling, which this code "
      "does not do (small gradients would underflow to zero); use --config.dtype=bfloat16 "
      "(float32's range, the same speed on TPUs and on A100/H100-class GPUs)"
    )
  _check(config.dtype in _DTYPES, "dtype", f"one of {_DTYPES[:2]}", config.dtype)
  _check(config.remat in REMAT_POLICIES, "remat", f"one of {tuple(REMAT_POLICIES)}", config.remat)
  _check(config.kernels in SETTINGS, "kernels", f"one of {SETTINGS}", config.kernels)
  for key in ("teacher", "eval"):
    _check(
      config[key].input_norm in ("", "unit", "imagenet"),
      f"{key}.input_norm",
      "'unit', 'imagenet' or '' (what the checkpoint records)",
      config[key].input_norm,
    )
  _check(
    config.teacher_dtype in _DTYPES + ("",),
    "teacher_dtype",
    f"one of {_DTYPES} (or empty: config.dtype)",
    config.teacher_dtype,
  )
  try:
    loss_settings(get_method(config.method), config.distill)
    for name in (*config.recipe.methods, *config.recipe.pair_methods):
      get_method(name)
  except ValueError as e:
    raise UserError(f"config.method / config.distill / config.recipe.methods: {e}") from None
  if config.eval.variant:
    role = get_method(config.method).trains
    try:
      archs.get_arch_variant(config[role].arch, config.eval.variant)
    except ValueError as e:
      raise UserError(
        f"config.eval.variant (config.{role}.arch={config[role].arch!r}): {e}"
      ) from None
  weights = tuple(config.class_weights)
  if weights and (
    len(weights) != config.num_classes or not all(isinstance(w, (int, float)) for w in weights)
  ):
    raise UserError(
      f"config.class_weights has {len(weights)} entries ({weights[:3]}...); "
      f"expected {config.num_classes} numbers (config.num_classes), or () for "
      "unweighted cross-entropy"
    )
  for key in ("total_steps", "log_every", "keep_checkpoints", "grad_accum_steps", "recipe.seeds"):
    _positive_int(config, key)
  _check_batch_size(config)
  for key in (
    "eval_every",
    "checkpoint_every",
    "teacher.check_images",
    "optimizer.warmup_steps",
    "optimizer.decay_steps",
    "recipe.teacher_steps",
    "recipe.student_batch_size",
    "recipe.student_steps",
    "recipe.student_decay_steps",
    "recipe.pair_steps",
    "recipe.pair_teacher_steps",
  ):
    _positive_int(config, key, allow_zero=True)
  pairs_of(config)  # each entry names two models
  steps = tuple(config.profile_steps)
  _check(
    not steps
    or (len(steps) == 2 and all(isinstance(s, int) for s in steps) and 1 <= steps[0] <= steps[1]),
    "profile_steps",
    "() or (first, last) with 1 <= first <= last",
    steps,
  )
  student_steps = config.recipe.student_steps
  if student_steps and config.optimizer.warmup_steps > student_steps:
    raise UserError(
      f"config.optimizer.warmup_steps ({config.optimizer.warmup_steps}) must not "
      f"exceed config.recipe.student_steps ({student_steps}), the student-alone "
      "row's steps"
    )
  if config.optimizer.warmup_steps > config.total_steps:
    raise UserError(
      f"config.optimizer.warmup_steps ({config.optimizer.warmup_steps}) must not "
      f"exceed config.total_steps ({config.total_steps})"
    )
  _check(
    config.eval_protocol in PROTOCOLS,
    "eval_protocol",
    f"one of {PROTOCOLS}",
    config.eval_protocol,
  )
  _check(config.sharding in RULES, "sharding", f"one of {tuple(RULES)}", config.sharding)
  shape = tuple(config.mesh_shape)
  _check(
    len(shape) == 2
    and shape.count(-1) <= 1
    and all(isinstance(s, int) and (s >= 1 or s == -1) for s in shape),
    "mesh_shape",
    "(data, model): positive integers, at most one -1",
    shape,
  )
  check_data_config(config.data)  # the dataset table, transforms, workers
