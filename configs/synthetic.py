"""The generated street-scene dataset: runs anywhere, no download, minutes on a CPU.

    # 1. a teacher (SegFormer-B2) on the generated data:
    python -m transkd_jax.main --config=configs/synthetic.py --workdir=/tmp/syn/teacher \\
        --config.method=teacher
    # 2. distil it into a B0 student from scratch:
    python -m transkd_jax.main --config=configs/synthetic.py --workdir=/tmp/syn/transkd \\
        --config.method=transkd_base --config.teacher.checkpoint=/tmp/syn/teacher

    # or the table: the teacher, then the student alone, TransKD-Base, ReviewKD and
    # logit KD, 3 seeds each (about an hour on a 2-core CPU): transkd_jax/recipe.py
    python -m transkd_jax.main --mode=recipe --config=configs/synthetic.py \\
        --workdir=/tmp/syn/recipe
    # the long version (about 3 hours): every method, and the public code's two other
    # pairs (PVTv2-B2 -> PVTv2-B0, SegFormer-B2 -> LVT)
    python -m transkd_jax.main --mode=recipe --config=configs/synthetic.py:full \\
        --workdir=/tmp/syn/recipe_full

The dataset (200 training and 50 validation scenes at 256x512, 19 Cityscapes
classes) is written on first use to ~/.cache/transkd_jax/ (or
--config.data.root). Models see 128x256 images. The default method trains the
student alone, so the command works without a teacher.
"""

from transkd_jax.config import base_config

PAIR_STEPS = 200  # each student run of the PVTv2 and LVT pairs
PAIR_TEACHER_STEPS = 400  # the PVTv2-B2 teacher


def get_config(version=None):
  """``version``: None (the default recipe) or "full" (every method and pair)."""
  if version not in (None, "", "full"):
    raise ValueError(f"configs/synthetic.py: unknown version {version!r}; expected 'full' or none")
  config = base_config()
  config.num_classes = 19
  config.image_size = (128, 256)
  config.method = "student"
  config.batch_size = 4
  config.total_steps = 300
  config.optimizer.lr = 6e-4  # a short schedule: 10x the public code's rate
  config.optimizer.decay_steps = 0  # decay over total_steps
  config.optimizer.warmup_steps = 20
  config.log_every = 20
  config.eval_every = 50  # the recipe's validation curves (results_curve.png)
  config.checkpoint_every = 100
  config.data.name = "generated"
  config.data.num_train = 200
  config.data.num_val = 50
  config.data.generated_size = (256, 512)
  # --mode=recipe: a B2 teacher for 800 steps (about 16 minutes on a 2-core CPU), then
  # each method's student runs, 300 steps and about 3 minutes each, for 3 seeds.
  config.recipe.teacher_steps = 800
  config.recipe.seeds = 3
  config.recipe.methods = ("student", "transkd_base", "reviewkd", "kd")
  if version == "full":
    # Every method, then the public code's two other pairs in miniature, the student
    # alone and TransKD-Base each: PVTv2-B2 (a teacher of its own, PAIR_TEACHER_STEPS)
    # -> PVTv2-B0, and the same SegFormer-B2 teacher -> LVT, PAIR_STEPS per run.
    config.recipe.methods = base_config().recipe.methods
    config.recipe.pairs = ("segformer-b2>segformer-b0", "pvtv2-b2>pvtv2-b0", "segformer-b2>lvt")
    config.recipe.pair_methods = ("student", "transkd_base")
    config.recipe.pair_steps = PAIR_STEPS
    config.recipe.pair_teacher_steps = PAIR_TEACHER_STEPS
  return config
