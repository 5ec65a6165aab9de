"""Cityscapes, the reference TransKD setting: SegFormer-B2 teacher -> B0 student.

    python -m transkd_jax.main --config=configs/cityscapes.py --workdir=/tmp/cs --mode=info

Values follow ../shared/REFERENCE.md (the public code's settings): 19 classes
(ignore label 255), images resized to 512 x 1024.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.num_classes = 19
  config.image_size = (512, 1024)  # (height, width) the models see

  config.teacher = ml_collections.ConfigDict()
  config.teacher.variant = "b2"

  config.student = ml_collections.ConfigDict()
  config.student.variant = "b0"

  config.dtype = "float32"  # compute dtype of the models; "bfloat16" on GPU/TPU
  return config
