"""The Flax model a family's weights belong to, and its variables' shapes (abstract
evaluation only: nothing is computed)."""

import jax
import jax.numpy as jnp
from flax import traverse_util

from transkd_jax.models import archs


def model_for(family: str, spec, num_classes: int):
  """The flax module of ``family`` for a variant row (transkd_jax.models.archs' build)."""
  return archs.ARCHS[family].model(variant=spec, num_classes=num_classes)


def expected_shapes(spec, num_classes: int, family: str = "segformer"):
  """{flax path: shape} of the model's variables, from abstract evaluation only."""
  model = model_for(family, spec, num_classes)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(shapes).items()}
