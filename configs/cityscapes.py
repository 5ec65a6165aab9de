"""Cityscapes, the reference TransKD setting: SegFormer-B2 teacher -> B0 student.

    python -m transkd_jax.main --config=configs/cityscapes.py --workdir=/runs/b0_transkd \\
        --config.data.root=/data/cityscapes --config.teacher.checkpoint=/ckpt/segformer_b2
    python -m transkd_jax.main --config=configs/cityscapes.py --workdir=/tmp/cs --mode=info

Values follow ../shared/REFERENCE.md (the public code's settings): 19 classes
(ignore label 255), images resized to 512 x 1024, no normalisation, flip and
+-2 px shift; TransKD-Base with HCL weight 1.0 and PEA weights (0.1, 0.1, 0.5,
1.0); ENet-style class weights; AdamW lr 6e-5, batch 2, 1000 epochs of 1488
steps with a linear decay laid over 1500 epochs (as the public code's
PolynomialLRDecay(max_decay_steps=1500) stepped per epoch; we step it per step).
Train the teacher first with ``--config.method=teacher --config.batch_size=8
--config.teacher.init=/ckpt/mit_b2`` (a converted ImageNet MiT-B2), or convert a
trained one with ``python -m transkd_jax.convert``.
"""

import ml_collections

# The public code's ENet-style class weights for the 19 Cityscapes train ids.
CITYSCAPES_CLASS_WEIGHTS = (
    2.5959737, 6.741505, 3.5353868, 9.866315, 9.690922, 9.369371, 10.289124, 9.953209,
    4.3098087, 9.490392, 7.674411, 9.396925, 10.347794, 6.3928986, 10.226673, 10.241072,
    10.28059, 10.396977, 10.05567)

STEPS_PER_EPOCH = 1488  # 2975 training images, batch 2


def get_config() -> ml_collections.ConfigDict:
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
  config.eval_split = "val"
  config.eval_protocol = "standard"        # or "reference" (the public code's, 1/4 labels)
  config.mesh_shape = (-1, 1)              # (data, model); -1 takes the remaining devices
  config.sharding = "replicate"            # or "fsdp": large arrays split along "model"

  config.data = ml_collections.ConfigDict()
  config.data.name = "cityscapes"
  config.data.root = ""
  return config
