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
from transkd_jax.models import kernels as kernels_lib
from transkd_jax.models.resize import resize_bilinear_sum

Dtype = Any


class _Conv1x1Params(nn.Module):
  """The parameters of a 1x1 ``nn.Conv`` (kernel 1 x 1 x in x out, optional bias).

  Same names, shapes and initialisation as ``nn.Conv(features, (1, 1))``; the
  head applies them itself (a 1x1 conv is a matmul over channels).
  """

  in_features: int
  features: int
  kernel_init: Any
  bias_init: Any = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self):
    kernel = self.param(
      "kernel", self.kernel_init, (1, 1, self.in_features, self.features), self.param_dtype
    )
    if self.bias_init is None:
      return kernel[0, 0], None
    return kernel[0, 0], self.param("bias", self.bias_init, (self.features,), self.param_dtype)


class SegFormerHead(nn.Module):
  """SegFormer's decode head, computed in an equivalent, cheaper order.

  The reference concatenates the four width-``width`` maps, all upsampled to
  stage-1 size, and applies the 1x1 fusion conv to the 4 x width channels.
  Everything before the BatchNorm is linear, and bilinear resizing is linear
  and acts on pixels while the 1x1 convs act on channels, so the two commute:
  each stage's slice of the fusion kernel is applied to that stage's own
  map *before* upsampling, composed with its ``linear_c`` layer into one
  (C_i x width) matmul at the stage's own resolution, and the four results
  are upsampled and summed. The same function up to float rounding (the
  bilinear weights of each output pixel sum to 1, so biases pass through).
  The fusion conv at 1/4 resolution is most of the textbook head's FLOPs;
  this order runs it at each stage's own resolution, and the 4 x width
  concatenation at 1/4 resolution is gone (docs/performance.md). Parameters
  are unchanged.
  """

  num_classes: int
  width: int
  dropout: float = 0.1
  kernels: str = "native"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jnp.ndarray], train: bool = False):
    size = features[0].shape[1:3]
    # mmcv's ConvModule: kaiming normal (fan_out, relu) and no bias before BN.
    fuse, _ = _Conv1x1Params(
      4 * self.width,
      self.width,
      init.conv_kernel(self.width),
      param_dtype=self.param_dtype,
      name="linear_fuse",
    )()
    # The concatenation order is stage 4, 3, 2, 1: rows [0:width] of the
    # fusion kernel act on stage 4, and so on.
    maps = []
    for slot, stage in enumerate((3, 2, 1, 0)):
      fan_in = features[stage].shape[-1]
      dense = nn.Dense(
        self.width,
        kernel_init=init.torch_default_kernel,
        bias_init=init.torch_default_bias(fan_in),
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=f"linear_c{stage + 1}",
      )
      if self.is_initializing():
        dense(features[stage])  # creates the parameters the usual way
      params = dense.variables["params"]
      block = fuse[slot * self.width : (slot + 1) * self.width]
      feat, kernel, bias, block = nn.dtypes.promote_dtype(
        features[stage], params["kernel"], params["bias"], block, dtype=self.dtype
      )
      # (f @ K + b) @ F == f @ (K @ F) + b @ F, at the stage's resolution.
      maps.append(kernels_lib.linear(feat, kernel @ block) + bias @ block)
    x = resize_bilinear_sum(maps, size, self.kernels)
    # PyTorch BatchNorm momentum 0.1 == flax momentum 0.9.
    x = nn.BatchNorm(
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="bn",
    )(x)
    x = nn.relu(x)
    # Dropout2d: whole channels, per sample.
    x = nn.Dropout(self.dropout, broadcast_dims=(1, 2))(x, deterministic=not train)
    pred, bias = _Conv1x1Params(
      self.width,
      self.num_classes,
      init.torch_default_kernel,
      init.torch_default_bias(self.width),
      param_dtype=self.param_dtype,
      name="linear_pred",
    )()
    x, pred, bias = nn.dtypes.promote_dtype(x, pred, bias, dtype=self.dtype)
    return kernels_lib.linear(x, pred) + bias
