"""What the three model families (SegFormer, PVTv2, LVT) share.

- ``StageEncoder``: the four-stage encoder loop of MiT (hence PVTv2) and LVT. Stage s
  (1..4): an overlapping patch embedding ``patch_embed{s}`` (``PATCH_GEOMETRY``), the
  stage's blocks ``block{s}_{j}`` with drop-path rates rising linearly over all blocks
  (the public ``linspace``), then what closes the stage (MiT: a LayerNorm; LVT:
  nothing). Each family says how it embeds, builds a block and closes a stage.
- ``SegmentationModel``: the wrapper around an encoder and a decoder: the image and
  class-count checks, ``encode`` (encoder only) and ``__call__`` (logits, features,
  embeddings). Its submodules are ``encoder``, ``head`` and, for PVTv2, ``neck``.
"""

from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from transkd_jax.models.head import SegFormerHead
from transkd_jax.models.variants import PATCH_GEOMETRY

Dtype = Any

# config.remat: what each encoder block keeps for the backward pass (jax.checkpoint's
# policies). "none": everything (no recomputation); "block": only the block's input,
# the rest recomputed in the backward pass; "block_save_dots": the block's matmul and
# convolution outputs too, the elementwise work (norms, GELU, softmax) recomputed.
REMAT_POLICIES = {
  "none": None,
  "block": jax.checkpoint_policies.nothing_saveable,
  "block_save_dots": jax.checkpoint_policies.dots_saveable,
}


def check_remat(remat: str) -> str:
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat={remat!r}: expected one of {', '.join(REMAT_POLICIES)}")
  return remat


def check_images(images, model: str):
  """The bad-input check every model runs first."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(
      f"{model} expects images of shape (N, H, W, 3) (NHWC, float); got {images.shape}"
    )


def check_num_classes(num_classes):
  if int(num_classes) < 1:
    raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")


def patch_embed(cls, stage: int, features: int, dtype, param_dtype, *more):
  """Stage ``stage``'s (0-based) patch embedding ``cls(features, kernel, stride, padding,
  dtype, param_dtype, *more)`` with that stage's ``PATCH_GEOMETRY``, named
  ``patch_embed{stage + 1}``."""
  kernel, stride, padding = PATCH_GEOMETRY[stage]
  return cls(
    features, kernel, stride, padding, dtype, param_dtype, *more, name=f"patch_embed{stage + 1}"
  )


class StageEncoder(nn.Module):
  """The four-stage encoder loop. Returns (stage maps NHWC, patch embeddings N x T x C).

  Subclasses define ``row`` (the variant row: channels, depths, drop_path_rate, ...),
  ``embed``, ``block`` and, where a stage ends in more than its last block, ``close``;
  all are called inside ``__call__`` and name the modules they create. What passes
  from one to the next (``state``) is the family's own: MiT's is (tokens, grid size),
  LVT's the NHWC map.
  """

  variant: Any
  kernels: str = "native"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str = "none"  # REMAT_POLICIES

  def row(self):
    raise NotImplementedError

  def block_class(self, cls, static_argnums):
    """``cls`` (a block module), rematerialised by ``self.remat``'s policy; names and
    parameters unchanged. ``static_argnums``: its non-array call arguments (from 1)."""
    policy = REMAT_POLICIES[check_remat(self.remat)]
    if policy is None:
      return cls
    return nn.remat(cls, policy=policy, static_argnums=static_argnums)

  def embed(self, stage: int, spec, x):
    """Stage ``stage``'s (0-based) patch embedding of x -> (state, embedding N x T x C)."""
    raise NotImplementedError

  def block(self, stage: int, index: int, spec, drop_path: float, state, train: bool):
    """Block ``index`` of stage ``stage``, applied to ``state`` -> the next state."""
    raise NotImplementedError

  def close(self, stage: int, state):
    """The state after the stage's last block -> the stage map (NHWC)."""
    return state

  @nn.compact
  def __call__(self, images, train: bool = False):
    spec = self.row()
    # Public: rate * (block index) / (blocks - 1), i.e. a linspace.
    rates = np.linspace(0.0, spec.drop_path_rate, sum(spec.depths))
    features, embeddings = [], []
    x = images
    block_index = 0
    for stage in range(4):
      state, embedding = self.embed(stage, spec, x)
      embeddings.append(embedding)
      for j in range(spec.depths[stage]):
        state = self.block(stage, j, spec, float(rates[block_index]), state, train)
        block_index += 1
      x = self.close(stage, state)
      features.append(x)
    return tuple(features), tuple(embeddings)


class SegmentationModel(nn.Module):
  """An encoder and a decoder; returns {"logits", "features", "embeddings"}.

  Subclasses define ``row`` (the variant row), ``encoder_class`` and, unless their
  decoder is SegFormer's all-MLP head, ``make_decoder(spec)`` and ``decode``. Errors
  name the model by its class name.
  """

  variant: Any = "b0"
  num_classes: int = 19
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernels: str = "native"  # "cpu" | "native" | "tpu": transkd_jax/models/kernels.py
  remat: str = "none"  # the encoder blocks' rematerialisation: REMAT_POLICIES

  def row(self):
    raise NotImplementedError

  encoder_class = StageEncoder  # the family's encoder, built from the variant row

  def make_encoder(self, spec) -> nn.Module:
    return self.encoder_class(spec, self.kernels, self.dtype, self.param_dtype, self.remat)

  def make_decoder(self, spec) -> Dict[str, nn.Module]:
    """The decoder's submodules by attribute name: SegFormer's all-MLP head by default."""
    head = SegFormerHead(
      self.num_classes,
      spec.decoder_width,
      spec.head_dropout,
      self.kernels,
      self.dtype,
      self.param_dtype,
    )
    return {"head": head}

  def setup(self):
    spec = self.row()
    check_num_classes(self.num_classes)
    self.encoder = self.make_encoder(spec)
    for name, module in self.make_decoder(spec).items():
      setattr(self, name, module)

  def encode(self, images, train: bool = False):
    """Encoder only: {"features", "embeddings"}; the decoder is not run."""
    check_images(images, type(self).__name__)
    features, embeddings = self.encoder(images.astype(self.dtype), train)
    return {"features": features, "embeddings": embeddings}

  def decode(self, features, train: bool = False):
    """Stage maps -> logits."""
    return self.head(features, train)

  def __call__(self, images, train: bool = False):
    out = self.encode(images, train)
    logits = self.decode(out["features"], train)
    return {"logits": logits.astype(jnp.float32), **out}
