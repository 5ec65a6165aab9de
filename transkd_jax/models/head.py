"""SegFormer's all-MLP decode head, NHWC.

Each stage map -> its own linear layer to the decoder width; stages 2-4 are
resized bilinearly (align_corners=False) to stage-1 size; concatenated in the
order 4, 3, 2, 1; 1x1 conv (no bias) + BatchNorm + ReLU; channel dropout; 1x1
conv with bias to the classes. Logits come out at 1/4 of the input size.
"""

from typing import Any, Sequence

import jax.numpy as jnp
from flax import linen as nn

from transkd_jax.models import initializers as init
from transkd_jax.models.resize import resize_bilinear

Dtype = Any


class SegFormerHead(nn.Module):
  num_classes: int
  width: int
  dropout: float = 0.1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jnp.ndarray], train: bool = False):
    size = features[0].shape[1:3]
    branches = []
    for stage in (3, 2, 1, 0):
      fan_in = features[stage].shape[-1]
      y = nn.Dense(self.width, kernel_init=init.torch_default_kernel,
                   bias_init=init.torch_default_bias(fan_in), dtype=self.dtype,
                   param_dtype=self.param_dtype, name=f"linear_c{stage + 1}")(features[stage])
      branches.append(resize_bilinear(y, size))
    x = jnp.concatenate(branches, axis=-1)
    # mmcv's ConvModule: kaiming normal (fan_out, relu) and no bias before BN.
    x = nn.Conv(self.width, (1, 1), use_bias=False, kernel_init=init.conv_kernel(self.width),
                dtype=self.dtype, param_dtype=self.param_dtype, name="linear_fuse")(x)
    # PyTorch BatchNorm momentum 0.1 == flax momentum 0.9.
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                     dtype=self.dtype, param_dtype=self.param_dtype, name="bn")(x)
    x = nn.relu(x)
    # Dropout2d: whole channels, per sample.
    x = nn.Dropout(self.dropout, broadcast_dims=(1, 2))(x, deterministic=not train)
    return nn.Conv(self.num_classes, (1, 1), kernel_init=init.torch_default_kernel,
                   bias_init=init.torch_default_bias(self.width), dtype=self.dtype,
                   param_dtype=self.param_dtype, name="linear_pred")(x)
