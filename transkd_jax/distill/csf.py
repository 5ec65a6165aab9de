"""Cross Selective Fusion (CSF): student stage maps -> teacher-width maps.

One unit per stage, run from the deepest stage to the shallowest; each unit
fuses its stage with the deeper unit's width-64 map through selective-kernel
channel attention (docs/transkd.md#cross-selective-fusion-csf-and-hcl). Its outputs are
compared with the teacher's stage maps by the hierarchical context loss.

Batch of one: the public code switches to a branch without BatchNorm (its
``fc1``) when a batch holds one image. We do the same computation for every
batch size: the attention's BatchNorm always runs (batch statistics in
training, running averages at evaluation), so a model's behaviour never depends
on how many images a device happens to see. The public branch's 1x1 weights
(``fc_single``, 64 x 32 per fused unit) are still declared, unused, so the
wrapper's parameter count and tree equal the public code's (TransKD-Base:
4,563,124 with a 20-way head); they receive zero gradient.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

from transkd_jax.distill.layers import FusionChain, FusionUnit, batch_norm, conv
from transkd_jax.models import initializers as init


class CSFUnit(FusionUnit):
  """One fusion unit; fusing: selective-kernel channel attention between the unit's map
  and the deeper one. Returns (teacher-width output, width-``mid`` map passed on)."""

  kind = "CSF"

  def mix(self, x, y, train: bool):
    dt, pdt = self.dtype, self.param_dtype
    width = max(self.mid // 16, 32)
    s = jnp.mean(x + y, axis=(1, 2), keepdims=True)  # global average pool of U
    z = conv(width, 1, "fc", dt, pdt, kernel_init=init.torch_default_kernel)(s)
    z = nn.relu(batch_norm(train, "fc_bn", dt, pdt)(z))
    # The public code's batch-of-one branch: declared for parity, never used.
    self.param("fc_single", init.torch_default_kernel, (1, 1, self.mid, width), pdt)
    a = jnp.stack(
      [
        conv(
          self.mid,
          1,
          f"fcs_{i}",
          dt,
          pdt,
          use_bias=True,
          kernel_init=init.torch_default_kernel,
          fan_in=width,
        )(z)
        for i in range(2)
      ]
    )
    a = jax.nn.softmax(a.astype(jnp.float32), axis=0).astype(x.dtype)  # across branches
    self.sow("intermediates", "branch_weights", a)
    return a[0] * x + a[1] * y


class CrossSelectiveFusion(FusionChain):
  """Four CSF units; maps student stage maps (shallow -> deep) to teacher widths."""

  unit = CSFUnit
