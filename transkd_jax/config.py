"""Every config key, with its default: what dataset configs (configs/*.py) start from.

Defaults are the public TransKD code's settings for Cityscapes (REFERENCE.md).
A config file calls ``base_config()`` and sets what differs for its dataset;
``python -m transkd_jax.main --config=configs/<name>.py --config.key=value``
overrides any key.
"""

import ml_collections

from transkd_jax.data import default_data_config
from transkd_jax.errors import UserError

STEPS_PER_EPOCH = 1488  # Cityscapes: 2975 training images, batch 2


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.num_classes = 19
  config.image_size = (512, 1024)  # (height, width) the models see

  config.teacher = ml_collections.ConfigDict()
  config.teacher.variant = "b2"
  config.teacher.checkpoint = ""   # Orbax dir: transkd_jax.convert output or a teacher run
  config.teacher.init = ""         # for --config.method=teacher: a converted ImageNet MiT

  config.student = ml_collections.ConfigDict()
  config.student.variant = "b0"
  config.student.init = ""         # empty: from scratch, as in TransKD

  config.dtype = "float32"          # compute dtype of the models; "bfloat16" on GPU/TPU
  config.teacher_dtype = "float32"  # the frozen teacher's compute dtype

  # Distillation: student | transkd_base | transkd_gl | transkd_ea | kd | cwd |
  # reviewkd | fitnet (transkd_jax/distill/methods.py), or teacher (train the teacher).
  config.method = "transkd_base"
  config.class_weights = ()  # cross-entropy class weights (one per class); () for plain CE
  config.distill = ml_collections.ConfigDict()
  config.distill.hcl_weight = 1.0                  # CSF / ReviewKD feature maps
  config.distill.pea_weights = (0.1, 0.1, 0.5, 1.0)  # patch embeddings, stages 1-4
  config.distill.fusion_channels = 64              # CSF / ABF middle width
  config.distill.gl_heads = 8                      # GL-Mixer attention heads
  config.distill.gl_residual = False               # off in the published evaluation
  config.distill.gl_mix_init = (1.0, 1.0)          # GL-Mixer's a, b (public: uninitialised)
  config.distill.kd_weight = 0.5                   # logit KD (public flags: alpha 0.5, tau 1)
  config.distill.kd_temperature = 1.0
  config.distill.cwd_weight = 1.0                  # channel-wise distillation (public: 1, T 1)
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

  config.batch_size = 2                    # global, over all devices and processes
  config.total_steps = 1000 * STEPS_PER_EPOCH
  config.seed = 0
  config.log_every = 50
  config.eval_every = STEPS_PER_EPOCH      # validate once per epoch, as the public code
  config.checkpoint_every = 1000
  config.keep_checkpoints = 3              # latest N, plus the best by validation mIoU
  config.train_split = "train"
  config.eval_split = "val"
  config.eval_protocol = "standard"        # or "reference" (the public code's, 1/4 labels)
  config.mesh_shape = (-1, 1)              # (data, model); -1 takes the remaining devices
  config.sharding = "replicate"            # or "fsdp": large arrays split along "model"

  # --mode=eval and --mode=predict (transkd_jax/evaluate.py, transkd_jax/predict.py).
  config.eval = ml_collections.ConfigDict()
  config.eval.checkpoint = ""   # a run's workdir or an Orbax dir; empty: --workdir's best
  config.eval.variant = ""      # the SegFormer to load; empty: the run's trained model
  config.predict = ml_collections.ConfigDict()
  config.predict.input = ""     # an image file, a directory (searched recursively) or a glob
  config.predict.output_dir = ""  # empty: WORKDIR/predictions
  config.predict.resize = True  # True: the model sees config.image_size; False: native size
  config.predict.cityscapes_format = False  # also write <name>_labelIds.png for the server
  config.predict.overlay_alpha = 0.5  # weight of the colour map in the overlay

  config.data = default_data_config()  # keys: transkd_jax/data/__init__.py

  # python -m transkd_jax.recipe (transkd_jax/recipe.py): the paper's table on one dataset.
  config.recipe = ml_collections.ConfigDict()
  config.recipe.methods = ("student", "transkd_base", "transkd_gl", "transkd_ea", "kd", "cwd",
                           "reviewkd", "fitnet")  # each trains the student for total_steps
  config.recipe.teacher_steps = 0  # the teacher's training steps; 0: config.total_steps
  return config


_DTYPES = ("float32", "bfloat16", "float16")


def validate_config(config):
  """Checks the keys every mode needs; raises UserError naming the key."""
  from transkd_jax.models.variants import get_variant
  for role in ("teacher", "student"):
    try:
      get_variant(config[role].variant)
    except (KeyError, AttributeError) as e:
      raise UserError(f"config.{role}.variant is missing ({e})") from None
    except ValueError as e:
      raise UserError(f"config.{role}.variant: {e}") from None
  if not isinstance(config.num_classes, int) or config.num_classes < 1:
    raise UserError(f"config.num_classes must be a positive integer, got {config.num_classes!r}")
  size = tuple(config.image_size)
  if len(size) != 2 or not all(isinstance(s, int) and s >= 32 for s in size):
    raise UserError(f"config.image_size must be (height, width), each >= 32; got {size!r}")
  if config.dtype not in _DTYPES:
    raise UserError(f"config.dtype must be one of {_DTYPES}, got {config.dtype!r}")
  from transkd_jax.distill import loss_settings
  try:
    if config.method != "teacher":
      loss_settings(config.method, config.get("distill"))
  except ValueError as e:
    raise UserError(f"config.method / config.distill: {e}") from None
  weights = config.get("class_weights") or ()
  if weights and (len(weights) != config.num_classes or
                  not all(isinstance(w, (int, float)) for w in weights)):
    raise UserError(f"config.class_weights has {len(weights)} entries ({tuple(weights)[:3]}...); "
                    f"expected {config.num_classes} numbers (config.num_classes), or () for "
                    "unweighted cross-entropy")
