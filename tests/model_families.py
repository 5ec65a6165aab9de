"""Helpers shared by the model-family tests (test_pvtv2, test_lvt, test_archs)."""

import math

import jax
import jax.numpy as jnp
import numpy as np


def apply_jit(model, *args, **kwargs):
  """model.apply under jit (eager op-by-op dispatch is slow on CPU)."""
  static = tuple(k for k in ("train", "method", "mutable") if k in kwargs)
  return jax.jit(model.apply, static_argnames=static)(*args, **kwargs)


def init_shapes(model, size=(64, 64)):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *size, 3))))


def count(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def random_variables(module, *args, seed=0, scale=0.1):
  """Variables of ``module`` with random values, from abstract init (no init compile).

  Normal(0, scale) everywhere; LayerNorm / BatchNorm scales and BatchNorm variances
  1 + |normal(0, scale)|.
  """
  shapes = jax.eval_shape(module.init, jax.random.key(0), *args)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    x = rng.normal(scale=scale, size=leaf.shape).astype(leaf.dtype)
    if jax.tree_util.keystr(path).endswith(("['scale']", "['var']")):
      x = 1 + np.abs(x)
    return jnp.asarray(x)

  return jax.tree_util.tree_map_with_path(draw, shapes)
