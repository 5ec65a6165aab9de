"""Benchmarks: one JSON line per measurement, never part of the tests.

    python -m transkd_jax.benchmark step  --config=configs/cityscapes.py [--config.x=y] [--steps=5]
    python -m transkd_jax.benchmark data  --config=configs/cityscapes.py [--workers=0,1,2]
    python -m transkd_jax.benchmark eval  --config=configs/cityscapes.py [--steps=5]
    python -m transkd_jax.benchmark model --config=configs/cityscapes.py [--kernels=cpu,native]
        [--steps=5] [--profile=N]
    python -m transkd_jax.benchmark compile --config=configs/cityscapes.py --topology=v5e:2x2
    python -m transkd_jax.benchmark infer --checkpoint=WORKDIR [--sizes=512x1024] [--batch=1]

One flag system for all six: a config file with ``--config.key=value``
overrides (sizes, batch, dtype, method, variants come from the config) and a
few flags of the benchmark itself. ``step.py`` times the train step,
``data.py`` the input pipeline, ``eval.py`` the evaluation step, ``model.py``
the teacher's encoder and the student's forward + backward, ``compile.py``
compiles the train and eval steps for a TPU topology or this process's
devices and sizes them (memory, FLOPs, collectives, kernel forms, a roofline
bound) without running them, ``infer.py`` a trained student's serving path against
onnxruntime running its ONNX export (the one benchmark that takes a checkpoint, not a
config).
"""
