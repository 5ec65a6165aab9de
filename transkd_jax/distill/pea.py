"""Patch Embedding Alignment (PEA): one linear projection per stage.

Maps each student patch embedding (N x tokens x student channels) to the
teacher's channel count of that stage; the loss (``losses.weighted_mse``) is
sum_i w_i * MSE(proj_i(student_i), teacher_i), w = (0.1, 0.1, 0.5, 1.0).
"""

from flax import linen as nn

from transkd_jax.distill.layers import StageAdapter, check_stage_count, dense


class PatchEmbedAlignment(StageAdapter):
  @nn.compact
  def __call__(self, embeddings):
    check_stage_count("PatchEmbedAlignment", embeddings)
    return tuple(
      dense(self.teacher_channels[i], e.shape[-1], f"proj{i + 1}", self.dtype, self.param_dtype)(e)
      for i, e in enumerate(embeddings)
    )
