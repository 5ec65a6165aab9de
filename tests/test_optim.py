"""The optimiser: the learning-rate schedule and the weight-decay mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transkd_jax.config import base_config
from transkd_jax.optim import make_optimizer, make_schedule


def _opt(**values):
  """config.optimizer's defaults, decaying over the run (decay_steps 0), with ``values``."""
  opt = base_config().optimizer
  opt.update(decay_steps=0, **values)
  return opt


def test_schedule_is_linear_decay_with_optional_warmup():
  opt = _opt(lr=1.0)
  schedule = make_schedule(opt, 10)
  np.testing.assert_allclose([schedule(s) for s in (0, 5, 10)], [1.0, 0.5, 0.0], atol=1e-7)
  opt.warmup_steps = 2
  schedule = make_schedule(opt, 10)
  np.testing.assert_allclose(
    [schedule(s) for s in (0, 1, 2, 6, 10)], [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-7
  )
  with pytest.raises(ValueError, match="warmup_steps"):
    make_schedule(_opt(lr=1.0, warmup_steps=11), 10)


def test_no_decay_mask_spares_vectors_only():
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  for flag, expect_b in ((False, 0.9), (True, 1.0)):
    opt = _opt(lr=1.0, weight_decay=0.1, no_decay_norms_biases=flag)
    tx, _ = make_optimizer(opt, 100)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    new = jax.tree.map(lambda p, u: p + u, params, updates)
    np.testing.assert_allclose(new["w"], 0.9, rtol=1e-6)
    np.testing.assert_allclose(new["b"], expect_b, rtol=1e-6)
