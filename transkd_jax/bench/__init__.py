"""Benchmarks: one JSON line per measurement, never part of the tests.

    python -m transkd_jax.benchmark step  --config=configs/cityscapes.py [--config.x=y] [--steps=5]
    python -m transkd_jax.benchmark data  --config=configs/cityscapes.py [--workers=0,1,2]
    python -m transkd_jax.benchmark eval  --config=configs/cityscapes.py [--steps=5]
    python -m transkd_jax.benchmark model --config=configs/cityscapes.py [--dwconv=auto,shifted,conv]
        [--steps=5] [--profile=N]

One flag system for all four: a config file with ``--config.key=value``
overrides (sizes, batch, dtype, method, variants come from the config) and a
few flags of the benchmark itself. ``step.py`` times the train step,
``data.py`` the input pipeline, ``eval.py`` the evaluation step, ``model.py``
the teacher's encoder and the student's forward + backward.
"""
