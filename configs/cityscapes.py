"""Cityscapes, the reference TransKD setting: SegFormer-B2 teacher -> B0 student.

    python -m transkd_jax.main --config=configs/cityscapes.py --workdir=/tmp/cs --mode=info
    python -m transkd_jax.main --config=configs/cityscapes.py --workdir=/tmp/cs --mode=info \\
        --config.method=transkd_ea

Values follow ../shared/REFERENCE.md (the public code's settings): 19 classes
(ignore label 255), images resized to 512 x 1024, TransKD-Base with HCL weight
1.0 and PEA weights (0.1, 0.1, 0.5, 1.0), ENet-style class weights.
"""

import ml_collections

# The public code's ENet-style class weights for the 19 Cityscapes train ids.
CITYSCAPES_CLASS_WEIGHTS = (
    2.5959737, 6.741505, 3.5353868, 9.866315, 9.690922, 9.369371, 10.289124, 9.953209,
    4.3098087, 9.490392, 7.674411, 9.396925, 10.347794, 6.3928986, 10.226673, 10.241072,
    10.28059, 10.396977, 10.05567)


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.num_classes = 19
  config.image_size = (512, 1024)  # (height, width) the models see

  config.teacher = ml_collections.ConfigDict()
  config.teacher.variant = "b2"

  config.student = ml_collections.ConfigDict()
  config.student.variant = "b0"

  config.dtype = "float32"  # compute dtype of the models; "bfloat16" on GPU/TPU

  # Distillation: student | transkd_base | transkd_gl | transkd_ea | kd | cwd |
  # reviewkd | fitnet (transkd_jax/distill/methods.py).
  config.method = "transkd_base"
  config.class_weights = CITYSCAPES_CLASS_WEIGHTS  # cross-entropy weights; () for plain CE
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
  return config
