"""The optimiser: optax AdamW with a per-step polynomial decay.

Keys (``config.optimizer``): ``lr`` (6e-5), ``b1``/``b2``/``eps`` (0.9, 0.999,
1e-8), ``weight_decay`` (0.01), ``decay_power`` (1.0: linear, as the public
code's poly policy), ``end_lr`` (0.0), ``warmup_steps`` (0), ``grad_clip_norm``
(0 = off), ``decay_steps`` (0 = ``config.total_steps``; the public code decays
over 1500 epochs but trains 1000), ``no_decay_norms_biases`` (False: the public code decays
everything; True exempts every array with fewer than 2 dimensions).
The public code steps its decay once per epoch; we step it every step.
"""

import jax
import optax


def make_schedule(opt, total_steps: int):
  total_steps = max(int(total_steps), 1)
  warmup = int(opt.warmup_steps)
  if warmup > total_steps:
    raise ValueError(
      f"config.optimizer.warmup_steps ({warmup}) must not exceed config.total_steps ({total_steps})"
    )
  horizon = int(opt.decay_steps) or total_steps
  decay = optax.polynomial_schedule(
    opt.lr, opt.end_lr, opt.decay_power, transition_steps=max(horizon - warmup, 1)
  )
  if not warmup:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, opt.lr, warmup), decay], [warmup])


def _decay_mask(params):
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(opt, total_steps: int):
  """(optax transformation, learning-rate schedule) from ``config.optimizer``."""
  schedule = make_schedule(opt, total_steps)
  mask = _decay_mask if opt.no_decay_norms_biases else None
  tx = optax.adamw(
    schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay, mask=mask
  )
  clip = float(opt.grad_clip_norm)
  if clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  return tx, schedule
