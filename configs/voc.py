"""Pascal VOC 2012 with SBD's augmented set (10,582 training images), 21 classes.

    python -m transkd_jax.main --config=configs/voc.py --workdir=/runs/voc_transkd \\
        --config.data.root=/data/VOCdevkit/VOC2012 --config.teacher.checkpoint=/ckpt/voc_b2

Images resized to 512x512 (VOC images are at most 500 px on a side), plain
cross-entropy (no class weights), 255 (object borders) ignored.
"""

from transkd_jax.config import base_config

STEPS_PER_EPOCH = 5291  # 10,582 images, batch 2


def get_config():
  config = base_config()
  # The public code's 2 images per GPU: 2 on one device (its setting), 16 on 8.
  config.per_device_batch_size = 2
  config.batch_size = 0
  config.num_classes = 21
  config.image_size = (512, 512)
  config.class_weights = ()
  config.total_steps = 100 * STEPS_PER_EPOCH
  config.optimizer.decay_steps = 0
  config.eval_every = STEPS_PER_EPOCH
  config.train_split = "train_aug"
  config.data.name = "voc"
  config.data.root = ""  # --config.data.root=/path/to/VOCdevkit/VOC2012
  config.data.eval_label_pad = (500, 500)  # VOC images differ in size, at most 500 a side
  return config
