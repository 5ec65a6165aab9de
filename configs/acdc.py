"""ACDC (adverse conditions: fog, night, rain, snow), Cityscapes' 19 classes.

    python -m transkd_jax.main --config=configs/acdc.py --workdir=/runs/acdc_transkd \\
        --config.data.root=/data/acdc --config.teacher.checkpoint=/ckpt/acdc_b2

The public code's ACDC setting: as Cityscapes (B2 -> B0, TransKD-Base, 512x1024,
ENet-style class weights), over all four conditions (``--config.data.conditions=fog,night``
selects some). ACDC has 1600 training images: 800 steps per epoch at batch 2.
"""

from transkd_jax.config import base_config
from transkd_jax.data.classes import CITYSCAPES_CLASS_WEIGHTS

STEPS_PER_EPOCH = 800
STUDENT_STEPS_PER_EPOCH = 400  # train_student.py: batch 4


def get_config():
  config = base_config()
  # The public code's 2 images per GPU: 2 on one device (its setting), 16 on 8.
  config.per_device_batch_size = 2
  config.batch_size = 0
  config.num_classes = 19
  config.image_size = (512, 1024)
  config.class_weights = CITYSCAPES_CLASS_WEIGHTS
  config.total_steps = 1000 * STEPS_PER_EPOCH
  config.optimizer.decay_steps = 1500 * STEPS_PER_EPOCH
  config.eval_every = STEPS_PER_EPOCH
  config.data.name = "acdc"
  config.data.root = ""  # --config.data.root=/path/to/acdc
  config.data.conditions = "all"
  config.recipe.student_batch_size = 4  # the recipe's student-alone row: train_student.py
  config.recipe.student_steps = 500 * STUDENT_STEPS_PER_EPOCH
  config.recipe.student_decay_steps = 1500 * STUDENT_STEPS_PER_EPOCH
  return config
