"""Cityscapes, the public code's LVT pair: SegFormer-B2 teacher -> LVT student.

    python -m transkd_jax.main --config=configs/cityscapes_lvt.py --workdir=/runs/lvt_transkd \\
        --config.data.root=/data/cityscapes --config.teacher.checkpoint=/ckpt/segformer_b2
    python -m transkd_jax.main --config=configs/cityscapes_lvt.py --workdir=/tmp/lvt --mode=info

As the public train_TransKDBase_SegformerB2LVT.py: the SegFormer-B2 teacher of
configs/cityscapes.py and a Lite Vision Transformer student (convolutional
self-attention in stage 1, recursive atrous self-attention after it, SegFormer's
all-MLP head of width 256); everything else is configs/cityscapes.py. CSF and PEA
take their widths from the two models (student 64, 64, 160, 256 -> teacher 64,
128, 320, 512, as the public script's ``build_kd_trans(model, 5, [64, 64, 160, 256])``).
LVT's patch embeddings are its patch convolutions' outputs before their
LayerNorm, as the public model returns them.
An ImageNet LVT (``lvt_imagenet_pretrained.pth.tar``, converted with
``--arch=lvt``) can start the student: ``--config.student.init=/ckpt/lvt`` (off in
the public script, as here). The public train_student_lvt.py runs batch 8 for 1000
epochs: the recipe's student-alone row follows it.
"""

from transkd_jax.config import base_config
from transkd_jax.data.classes import CITYSCAPES_CLASS_WEIGHTS

SOLO_STEPS_PER_EPOCH = 372  # train_student_lvt.py: 2975 images at batch 8 (last batch kept)


def get_config():
  config = base_config()
  # The public code's 2 images per GPU: 2 on one device (its setting), 16 on 8.
  config.per_device_batch_size = 2
  config.batch_size = 0
  config.num_classes = 19
  config.image_size = (512, 1024)
  config.class_weights = CITYSCAPES_CLASS_WEIGHTS
  config.teacher.arch = "segformer"
  config.teacher.variant = "b2"
  config.student.arch = "lvt"
  config.student.variant = "lvt"
  config.data.name = "cityscapes"
  config.data.root = ""  # --config.data.root=/path/to/cityscapes
  config.recipe.student_batch_size = 8
  config.recipe.student_steps = 1000 * SOLO_STEPS_PER_EPOCH
  config.recipe.student_decay_steps = 1500 * SOLO_STEPS_PER_EPOCH
  return config
