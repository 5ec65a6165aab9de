"""Models: the Mix Transformer encoder, the SegFormer head, and SegFormer."""

from transkd_jax.models.head import SegFormerHead
from transkd_jax.models.mit import MixTransformer
from transkd_jax.models.segformer import SegFormer
from transkd_jax.models.variants import VARIANTS, MiTVariant, get_variant

__all__ = ["SegFormer", "SegFormerHead", "MixTransformer", "VARIANTS", "MiTVariant",
           "get_variant"]
