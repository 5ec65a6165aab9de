"""Cityscapes, the public code's PVTv2 pair: PVTv2-B2 teacher -> PVTv2-B0 student.

    python -m transkd_jax.main --config=configs/cityscapes_pvtv2.py --workdir=/runs/pvtv2_transkd \\
        --config.data.root=/data/cityscapes --config.teacher.checkpoint=/ckpt/pvtv2_b2_teacher
    python -m transkd_jax.main --config=configs/cityscapes_pvtv2.py --workdir=/tmp/pv --mode=info

As the public train_TransKDBase_PVTv2B2B0.py: both models are PVTv2 encoders with
the Semantic-FPN neck and head; everything else is configs/cityscapes.py
(TransKD-Base, HCL 1.0, PEA (0.1, 0.1, 0.5, 1.0), AdamW 6e-5, batch 2, 1000 epochs,
the decay laid over 1500). CSF and PEA take their widths from the two models
(student 32, 64, 160, 256 -> teacher 64, 128, 320, 512).
The teacher: convert one trained by the public train_teacher_pvtv2.py with
``python -m transkd_jax.convert --arch=pvt_v2_b2 --checkpoint=pvtv2b2_teacher_cityscapes.th
--output=/ckpt/pvtv2_b2_teacher --num-classes=19``, or train it here with
``--config.method=teacher --config.batch_size=8 --config.per_device_batch_size=0
--config.teacher.init=/ckpt/pvt_v2_b2``
(the official ImageNet ``pvt_v2_b2.pth``, converted with ``--arch=pvt_v2_b2``).
The public solo scripts (train_teacher_pvtv2.py, train_student_pvtv2.py) run
batch 8 for 1000 epochs: the recipe's student-alone row follows them.
"""

from transkd_jax.config import base_config
from transkd_jax.data.classes import CITYSCAPES_CLASS_WEIGHTS

SOLO_STEPS_PER_EPOCH = 372  # train_student_pvtv2.py: 2975 images at batch 8 (last batch kept)


def get_config():
  config = base_config()
  # The public code's 2 images per GPU: 2 on one device (its setting), 16 on 8.
  config.per_device_batch_size = 2
  config.batch_size = 0
  config.num_classes = 19
  config.image_size = (512, 1024)
  config.class_weights = CITYSCAPES_CLASS_WEIGHTS
  config.teacher.arch = "pvtv2"
  config.teacher.variant = "b2"
  config.student.arch = "pvtv2"
  config.student.variant = "b0"
  config.data.name = "cityscapes"
  config.data.root = ""  # --config.data.root=/path/to/cityscapes
  config.recipe.student_batch_size = 8
  config.recipe.student_steps = 1000 * SOLO_STEPS_PER_EPOCH
  config.recipe.student_decay_steps = 1500 * SOLO_STEPS_PER_EPOCH
  return config
