"""A freshly initialised decoder for a bare encoder (SegFormer / LVT: the head; PVTv2: the
neck and the head), initialised as the model initialises them."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from transkd_jax.weights.model import model_for


def _decode(module, features):
  neck = getattr(module, "neck", None)
  return module.head(neck(features) if neck is not None else features)


def fresh_decoder(spec, num_classes: int, seed: int, family: str = "segformer"):
  """{"params": {"head", ["neck"]}, ["batch_stats": {"head"}]} of a fresh decoder."""
  model = model_for(family, spec, num_classes)
  features = [jnp.zeros((1, 16 // 2**i, 16 // 2**i, c)) for i, c in enumerate(spec.channels)]
  variables = jax.jit(functools.partial(model.init, method=_decode))(jax.random.key(seed), features)
  return jax.tree.map(np.asarray, variables)
