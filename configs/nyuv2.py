"""NYUv2 with 40 classes (795 training, 654 test images), B2 -> B0, TransKD-Base.

    python -m transkd_jax.main --config=configs/nyuv2.py --workdir=/runs/nyuv2_transkd \\
        --config.data.root=/data/nyuv2 --config.teacher.checkpoint=/ckpt/nyuv2_b2

The layout is the public TransKD code's (``images/``, ``labels40/``,
``train.txt``/``test.txt``; see transkd_jax/data/sources.py). The public code
ships no NYUv2 training settings; these follow its script defaults: images at
their native 480x640, 500 epochs at batch 2 with poly decay over the run, plain
cross-entropy (no class weights), validation on the test split (NYUv2 has no
separate val split).
"""

from transkd_jax.config import base_config

STEPS_PER_EPOCH = 398  # 795 images, batch 2


def get_config():
  config = base_config()
  # The public code's 2 images per GPU: 2 on one device (its setting), 16 on 8.
  config.per_device_batch_size = 2
  config.batch_size = 0
  config.num_classes = 40
  config.image_size = (480, 640)
  config.class_weights = ()
  config.total_steps = 500 * STEPS_PER_EPOCH
  config.optimizer.decay_steps = 0  # 0: decay over total_steps
  config.eval_every = 10 * STEPS_PER_EPOCH
  config.eval_split = "test"
  config.data.name = "nyuv2"
  config.data.root = ""  # --config.data.root=/path/to/nyuv2
  return config
