"""The first command: distil on generated street scenes, minutes on a laptop CPU.

    python -m transkd_jax.main --mode=recipe --config=configs/quickstart.py \\
        --workdir=/tmp/transkd-quickstart

Trains a small teacher (SegFormer-B1) briefly on the generated data, then the
SegFormer-B0 student from scratch twice with the same budget and seed: alone,
and distilled from that teacher by TransKD-Base (CSF + HCL, PEA). Ends with a
table of each run's validation mIoU, steps and training time
(``WORKDIR/results.md``). Every run is an ordinary workdir: evaluate, predict
with or export ``WORKDIR/transkd_base`` on its own. ``configs/synthetic.py``
holds the longer miniature of the paper's table (a B2 teacher, every method).
"""

from transkd_jax.config import base_config


def get_config():
  config = base_config()
  config.num_classes = 19
  config.image_size = (128, 256)
  config.teacher.variant = "b1"
  config.student.variant = "b0"
  config.method = "student"
  config.batch_size = 4
  config.total_steps = 200  # each student run
  config.optimizer.lr = 6e-4  # a short schedule: 10x the public code's rate
  config.optimizer.decay_steps = 0  # decay over total_steps
  config.optimizer.warmup_steps = 20
  config.log_every = 50
  config.eval_every = 50  # the recipe's validation curves (results_curve.png)
  config.checkpoint_every = 0
  config.data.name = "generated"
  config.data.num_train = 200
  config.data.num_val = 50
  config.data.generated_size = (256, 512)
  config.recipe.methods = ("student", "transkd_base")
  config.recipe.teacher_steps = 400
  config.recipe.seeds = 1  # configs/synthetic.py runs 3 and reports mean +- std
  return config
