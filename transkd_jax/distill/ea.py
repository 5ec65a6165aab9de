"""Embedding Assistant (TransKD-EA): extra teacher-width patch embeddings.

Stage 1 embeds the image (kernel 7, stride 4, 3 -> teacher channels 1); stage
i > 1 embeds the student's stage i-1 map (kernel 3, stride 2, student channels
i-1 -> teacher channels i); each is a conv + LayerNorm, the same
``OverlapPatchEmbed`` the encoder uses. The aligned embedding of stage i is
w_i * proj_i(student_embed_i) + w_{i+4} * assistant_i with eight learnable
scalars initialised to 0.1, 0.2, ..., 0.8 (``fuse``).
"""

from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from transkd_jax.distill.layers import StageAdapter, check_stage_count
from transkd_jax.models.base import patch_embed
from transkd_jax.models.mit import OverlapPatchEmbed

Dtype = Any


class EmbeddingAssistant(StageAdapter):
  @nn.compact
  def __call__(self, images, student_maps):
    check_stage_count("EmbeddingAssistant", student_maps)
    inputs = [images, *student_maps[:3]]
    out = []
    for stage, x in enumerate(inputs):
      tokens, _ = patch_embed(
        OverlapPatchEmbed, stage, self.teacher_channels[stage], self.dtype, self.param_dtype
      )(x.astype(self.dtype))
      out.append(tokens)
    return tuple(out)


class EmbeddingFuse(nn.Module):
  """w_i * projected_i + w_{i+4} * assistant_i, with w initialised 0.1 .. 0.8."""

  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, projected, assistant):
    w = self.param(
      "fuse_weights",
      lambda key, shape, dtype: jnp.asarray(np.arange(1, 9) / 10, dtype),
      (8,),
      self.param_dtype,
    )
    return tuple(
      w[i].astype(p.dtype) * p + w[i + 4].astype(a.dtype) * a
      for i, (p, a) in enumerate(zip(projected, assistant))
    )
