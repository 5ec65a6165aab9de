"""SegFormer = MiT encoder + all-MLP head; the public model entry point.

    model = SegFormer(variant="b0", num_classes=19)
    variables = model.init(jax.random.key(0), images)          # params, batch_stats
    out = model.apply(variables, images, train=False)
    out["logits"]      # N x H/4 x W/4 x classes (float32)
    out["features"]    # four stage maps, NHWC
    out["embeddings"]  # four patch-embedding outputs, N x tokens x C

Training: ``model.apply(variables, images, train=True, rngs={"dropout": key},
mutable=["batch_stats"])``. A teacher that only needs its stage maps and patch
embeddings (every TransKD method but logit KD) calls
``model.apply(variables, images, method="encode")`` and skips the decode head,
which is most of a B2's FLOPs (docs/performance.md).
"""

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from transkd_jax.models.head import SegFormerHead
from transkd_jax.models.mit import MixTransformer
from transkd_jax.models.variants import get_variant

Dtype = Any


def _check_images(images):
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(
      f"SegFormer expects images of shape (N, H, W, 3) (NHWC, float); got {images.shape}"
    )


class SegFormer(nn.Module):
  variant: str = "b0"
  num_classes: int = 19
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernels: str = "native"  # "cpu" | "native": transkd_jax/models/kernels.py

  def setup(self):
    spec = get_variant(self.variant)
    if int(self.num_classes) < 1:
      raise ValueError(f"num_classes must be a positive integer, got {self.num_classes!r}")
    self.encoder = MixTransformer(self.variant, self.kernels, self.dtype, self.param_dtype)
    self.head = SegFormerHead(
      self.num_classes,
      spec.decoder_width,
      spec.head_dropout,
      self.kernels,
      self.dtype,
      self.param_dtype,
    )

  def encode(self, images, train: bool = False):
    """Encoder only: {"features", "embeddings"}; the head is not run."""
    _check_images(images)
    features, embeddings = self.encoder(images.astype(self.dtype), train)
    return {"features": features, "embeddings": embeddings}

  def __call__(self, images, train: bool = False):
    out = self.encode(images, train)
    logits = self.head(out["features"], train)
    return {"logits": logits.astype(jnp.float32), **out}
