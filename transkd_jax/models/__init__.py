"""Models: SegFormer (MiT encoder + all-MLP head), PVTv2 (+ FPN) and LVT; ``archs`` lists them."""

from transkd_jax.models.archs import ARCHS, Arch, build, check_arch, has_batch_stats, stage_channels
from transkd_jax.models.head import SegFormerHead
from transkd_jax.models.lvt import LVT, LVT_VARIANTS, LVTVariant, get_lvt_variant
from transkd_jax.models.mit import MixTransformer
from transkd_jax.models.pvtv2 import PVT_VARIANTS, PVTv2, get_pvt_variant
from transkd_jax.models.segformer import SegFormer
from transkd_jax.models.variants import VARIANTS, MiTVariant, get_variant

__all__ = [
  "SegFormer",
  "SegFormerHead",
  "MixTransformer",
  "VARIANTS",
  "MiTVariant",
  "get_variant",
  "PVTv2",
  "PVT_VARIANTS",
  "get_pvt_variant",
  "LVT",
  "LVT_VARIANTS",
  "LVTVariant",
  "get_lvt_variant",
  "ARCHS",
  "Arch",
  "build",
  "check_arch",
  "has_batch_stats",
  "stage_channels",
]
