"""A dataset of your own: images and masks in two directories, paired by stem
(``transkd_jax/data/folder.py``). The example folder: the generated scenes with Cityscapes'
seven categories as classes.

    python -m transkd_jax.data.folder_example /tmp/folder-data
    python -m transkd_jax.main --config=configs/folder.py --workdir=/tmp/folder-run \\
        --config.data.root=/tmp/folder-data

For a folder of your own set ``--config.num_classes`` to the number of names in its
class file (``config.data.folder_*``: where the images, masks, class file and split lists
are; ``transkd_jax/data/__init__.py`` lists them). The student trains alone from
scratch; 128x256 inputs, as configs/quickstart.py.
"""

from transkd_jax.config import base_config


def get_config():
  config = base_config()
  config.num_classes = 7  # the example's class file; yours: its number of names
  config.image_size = (128, 256)
  config.method = "student"
  config.batch_size = 4
  config.total_steps = 300
  config.optimizer.lr = 6e-4  # a short schedule: 10x the public code's rate
  config.optimizer.decay_steps = 0  # decay over total_steps
  config.optimizer.warmup_steps = 20
  config.log_every = 20
  config.eval_every = 100
  config.checkpoint_every = 100
  config.data.name = "folder"
  config.data.root = ""  # --config.data.root=/path/to/folder (local or gs://...)
  return config
