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

from transkd_jax.models.base import SegmentationModel
from transkd_jax.models.mit import MixTransformer
from transkd_jax.models.variants import get_variant


class SegFormer(SegmentationModel):
  """MiT encoder + SegFormer's all-MLP head."""

  variant: Any = "b0"
  encoder_class = MixTransformer

  def row(self):
    return get_variant(self.variant)
