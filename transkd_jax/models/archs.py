"""The model families, as data: one row per architecture.

    from transkd_jax.models import archs
    model = archs.build("pvtv2", "b2", num_classes=19, kernels="cpu")
    archs.stage_channels("lvt", "lvt")       # (64, 64, 160, 256)
    archs.has_batch_stats("pvtv2")           # False: no BatchNorm anywhere

Every model has SegFormer's contract: ``__call__(images, train=False)`` ->
{"logits" (N x H/4 x W/4 x classes, float32), "features" (four NHWC stage
maps), "embeddings" (four N x tokens x C patch embeddings)}, and
``encode(images, train=False)`` -> {"features", "embeddings"}. For all three
families a stage's feature map and its patch embedding have the same channels.
"""

from typing import Any, Callable, Mapping, NamedTuple, Tuple

import jax.numpy as jnp

from transkd_jax.models.base import check_remat
from transkd_jax.models.lvt import LVT, LVT_VARIANTS, get_lvt_variant
from transkd_jax.models.pvtv2 import PVT_VARIANTS, PVTv2, get_pvt_variant
from transkd_jax.models.segformer import SegFormer
from transkd_jax.models.variants import VARIANTS, get_variant


class PublicNames(NamedTuple):
  """How the public code's checkpoints name a family's tensors (transkd_jax/weights/ reads
  them): regexes and prefixes of public names, and Flax paths under "params"."""

  blocks: str  # a stage's block: {s} the stage 1-4 ({s0}: 0-3); group 1 the block index
  decoder: Tuple[str, ...]  # prefixes of the decoder's tensors (everything but the encoder)
  classifier: str  # prefix of the classifier
  ignored: Tuple[Tuple[str, str], ...]  # (regex, why): tensors deliberately not imported
  decoder_width: Tuple[str, ...]  # the Flax kernel whose last axis is the decoder width
  classes: Tuple[str, ...]  # the Flax kernel whose last axis is the class count


_SEGFORMER_HEAD = ("linear_c", "linear_fuse.", "linear_pred.")
_SEGFORMER_WIDTH = ("head", "linear_fuse", "kernel")
_SEGFORMER_CLASSES = ("head", "linear_pred", "kernel")


class Arch(NamedTuple):
  model: Any  # the flax module class: Model(variant, num_classes, dtype, ...)
  variants: Mapping[str, Any]  # the variant table (name -> row)
  get_variant: Callable[[Any], Any]  # name or row -> row; ValueError naming the allowed names
  has_batch_stats: bool  # whether the variables hold a batch_stats collection
  label: str  # for logs, tables and messages: "SegFormer", "PVTv2", "LVT"
  # The public code's names of its checkpoints' models (convert --arch, export), per variant.
  checkpoint_names: Mapping[str, str]
  public: PublicNames  # its tensors' names in those checkpoints


ARCHS = {
  "segformer": Arch(
    SegFormer,
    VARIANTS,
    get_variant,
    True,
    "SegFormer",
    {v: f"mit_{v}" for v in VARIANTS},
    PublicNames(
      blocks=r"block{s}\.(\d+)\.",
      decoder=_SEGFORMER_HEAD,
      classifier="linear_pred.",
      ignored=(
        (r"^head\.(weight|bias)$", "the MiT encoder's ImageNet classifier"),
        (r"^classifier\.", "the HuggingFace MiT encoder's ImageNet classifier"),
        (r"^conv_seg\.", "mmseg's unused conv_seg"),
      ),
      decoder_width=_SEGFORMER_WIDTH,
      classes=_SEGFORMER_CLASSES,
    ),
  ),
  "pvtv2": Arch(
    PVTv2,
    PVT_VARIANTS,
    get_pvt_variant,
    False,
    "PVTv2",
    {v: f"pvt_v2_{v}" for v in PVT_VARIANTS},
    PublicNames(
      blocks=r"backbone\.block{s}\.(\d+)\.",
      decoder=("neck.", "head."),
      classifier="head.conv_seg.",
      ignored=(
        (r"^head\.(weight|bias)$", "the PVTv2 encoder's ImageNet classifier"),
        (r"^classifier\.", "the HuggingFace PVTv2 encoder's ImageNet classifier"),
      ),
      decoder_width=("neck", "lateral_convs_0", "kernel"),
      classes=("head", "conv_seg", "kernel"),
    ),
  ),
  "lvt": Arch(
    LVT,
    LVT_VARIANTS,
    get_lvt_variant,
    True,
    "LVT",
    {v: v for v in LVT_VARIANTS},
    PublicNames(
      blocks=r"backbone\.{s0}\.1\.(\d+)\.",
      decoder=_SEGFORMER_HEAD,
      classifier="linear_pred.",
      ignored=((r"^(norm|head)\.(weight|bias)$", "LVT's ImageNet classifier (norm, head)"),),
      decoder_width=_SEGFORMER_WIDTH,
      classes=_SEGFORMER_CLASSES,
    ),
  ),
}


def check_arch(arch) -> str:
  """``arch`` if it names a family; ValueError naming the allowed values otherwise."""
  if arch not in ARCHS:
    raise ValueError(
      f"Unknown architecture {arch!r}; expected one of {', '.join(repr(a) for a in ARCHS)}"
    )
  return arch


def get_arch_variant(arch, variant):
  """The variant row of ``arch`` for ``variant`` (a name or a row)."""
  return ARCHS[check_arch(arch)].get_variant(variant)


def stage_channels(arch, variant):
  """The four stages' channels (feature maps and patch embeddings alike)."""
  return tuple(int(c) for c in get_arch_variant(arch, variant).channels)


def model_name(arch, variant) -> str:
  """A model's name for logs and tables: "SegFormer-B0", "PVTv2-B2", "LVT"."""
  label = ARCHS[check_arch(arch)].label
  if isinstance(variant, str) and variant == label.lower():  # a family of one variant
    return label
  return f"{label}-{str(variant).upper()}"


def from_checkpoint_name(name: str):
  """(arch, variant) of a public checkpoint model name ("mit_b2", "pvt_v2_b0", "lvt"), or None."""
  for arch, row in ARCHS.items():
    for variant, public in row.checkpoint_names.items():
      if public == name:
        return arch, variant
  return None


def has_batch_stats(arch) -> bool:
  return ARCHS[check_arch(arch)].has_batch_stats


def build(
  arch,
  variant,
  num_classes,
  *,
  kernels="native",
  dtype=jnp.float32,
  param_dtype=jnp.float32,
  remat="none",
):
  """The flax module of ``arch`` / ``variant`` (checked here, so errors come before any trace)."""
  get_arch_variant(arch, variant)
  return ARCHS[arch].model(
    variant=variant,
    num_classes=num_classes,
    dtype=dtype,
    param_dtype=param_dtype,
    kernels=kernels,
    remat=check_remat(remat),
  )
