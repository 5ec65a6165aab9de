"""TransKD's training-time modules and losses, and the baselines.

    from transkd_jax.distill import METHODS, Distiller, build_distiller, objective

``methods.py`` holds the method table, the ``Distiller`` wrapper (student +
adapters) and ``objective``; ``losses.py`` the pure loss functions; one module
per adapter: ``csf.py``, ``pea.py``, ``gl_mixer.py``, ``ea.py``, ``baselines.py``.
"""

from transkd_jax.distill.methods import (METHODS, Distiller, Method, build_distiller,
                                         check_pairing, get_method, loss_settings, objective)

__all__ = ["METHODS", "Distiller", "Method", "build_distiller", "check_pairing", "get_method",
           "loss_settings", "objective"]
