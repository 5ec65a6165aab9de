"""TransKD's training-time modules and losses, and the baselines.

    from transkd_jax.distill import METHODS, Distiller, get_method, objective

``methods.py`` holds the method table (rows that carry their adapters and loss
terms), the ``Distiller`` wrapper (trained model + adapters) and ``objective``;
``losses.py`` the pure loss functions; one module per adapter: ``csf.py``, ``pea.py``,
``gl_mixer.py``, ``ea.py``, ``baselines.py``.
"""

from transkd_jax.distill.methods import (
  METHODS,
  Distiller,
  Method,
  Term,
  check_outputs,
  check_pairing,
  get_method,
  loss_settings,
  objective,
)

__all__ = [
  "METHODS",
  "Distiller",
  "Method",
  "Term",
  "check_outputs",
  "check_pairing",
  "get_method",
  "loss_settings",
  "objective",
]
