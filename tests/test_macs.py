"""Multiply-adds by the model zoo's rule (transkd_jax/macs.py) against the published
numbers: the public TransKD README's 13.67 (SegFormer-B0) and 113.84 (SegFormer-B2)
GFLOPs at 512x1024, counted by mmcv 1.3.10's get_model_complexity_info on the public
model at its default 20 classes. The integers are that count, reproduced term by term
by hand (encoder convs and linears, norms, the public head order) and by mmcv's hooks on
the public PyTorch model.

Every term the rule counts is per pixel of some stage map, so the count at 128x256 is
exactly 1/16 of 512x1024's (every stage divides evenly): the test counts at 128x256.
"""

import pytest

from transkd_jax import macs
from transkd_jax.models import archs

ZOO_512x1024 = {  # variant -> multiply-adds at 512x1024, 20 classes
  "b0": 13_674_020_864,  # the README's 13.67
  "b2": 113_841_635_328,  # the README's 113.84
}


@pytest.mark.parametrize("variant", ["b0", "b2"])
def test_segformer_counts_the_published_multiply_adds(variant):
  model = archs.build("segformer", variant, 20)
  assert 16 * macs.count(model, (128, 256)) == ZOO_512x1024[variant]
  # The last class's linear_pred weights and bias at 1/4 resolution, 256 (B0) or 768 wide.
  width = {"b0": 256, "b2": 768}[variant]
  per_class = 32 * 64 * (width + 1)
  assert macs.count(archs.build("segformer", variant, 19), (128, 256)) == (
    ZOO_512x1024[variant] // 16 - per_class
  )


def test_a_model_with_modules_the_rule_does_not_know_is_not_counted():
  # LVT's attention holds its parameters in modules of its own: no count, not a wrong one.
  assert macs.count(archs.build("lvt", "lvt", 19), (64, 128)) is None
