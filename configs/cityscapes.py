"""Cityscapes, the reference TransKD setting: SegFormer-B2 teacher -> B0 student.

    python -m transkd_jax.main --config=configs/cityscapes.py --workdir=/runs/b0_transkd \\
        --config.data.root=/data/cityscapes --config.teacher.checkpoint=/ckpt/segformer_b2
    python -m transkd_jax.main --config=configs/cityscapes.py --workdir=/tmp/cs --mode=info

Values follow the public TransKD code's settings (docs/transkd.md): 19 classes
(ignore label 255), images resized to 512 x 1024, no normalisation, flip and
+-2 px shift; TransKD-Base with HCL weight 1.0 and PEA weights (0.1, 0.1, 0.5,
1.0); ENet-style class weights; AdamW lr 6e-5, batch 2, 1000 epochs of 1488
steps with a linear decay laid over 1500 epochs (as the public code's
PolynomialLRDecay(max_decay_steps=1500) stepped per epoch; we step it per step).
The recipe's student-alone row follows the public train_student.py instead:
batch 4, 500 epochs of 744 steps, the decay laid over 1500 of them.
Every key and its default: transkd_jax/config.py.
Train the teacher first with ``--config.method=teacher --config.batch_size=8
--config.per_device_batch_size=0
--config.teacher.init=/ckpt/mit_b2`` (a converted ImageNet MiT-B2), or convert a
trained one with ``python -m transkd_jax.convert``.
"""

from transkd_jax.config import base_config
from transkd_jax.data.classes import CITYSCAPES_CLASS_WEIGHTS

STUDENT_STEPS_PER_EPOCH = 744  # train_student.py: 2975 images at batch 4 (last batch kept)


def get_config():
  config = base_config()
  # The public code's 2 images per GPU: 2 on one device (its setting), 16 on 8.
  config.per_device_batch_size = 2
  config.batch_size = 0
  config.num_classes = 19
  config.image_size = (512, 1024)
  config.class_weights = CITYSCAPES_CLASS_WEIGHTS
  config.data.name = "cityscapes"
  config.data.root = ""  # --config.data.root=/path/to/cityscapes
  config.recipe.student_batch_size = 4
  config.recipe.student_steps = 500 * STUDENT_STEPS_PER_EPOCH
  config.recipe.student_decay_steps = 1500 * STUDENT_STEPS_PER_EPOCH
  return config
