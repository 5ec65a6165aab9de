"""The ONNX graphs of the three families: valid, standard ops only, and our logits under
onnxruntime at two sizes with a batch of 2; the label output is predict's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_families import random_variables

from transkd_jax import normalization
from transkd_jax.eval_step import predictions_at
from transkd_jax.models import MiTVariant, archs
from transkd_jax.models.lvt import LVTVariant
from transkd_jax.models.pvtv2 import PVT_VARIANTS

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install -e \".[test]\")")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")

from transkd_jax.weights.onnx_models import OPSET, onnx_model  # noqa: E402 (needs onnx)

CLASSES = 5
TINY = {
  "segformer": MiTVariant((8, 16, 24, 32), (1, 2, 1, 1), (1, 2, 3, 4), 16),
  "pvtv2": PVT_VARIANTS["b0"]._replace(channels=(8, 16, 24, 32), heads=(1, 2, 3, 4)),
  # Two blocks in the CSA stage, three RASA recursions: every path of the family.
  "lvt": LVTVariant(
    channels=(8, 16, 24, 32),
    depths=(2, 1, 1, 1),
    heads=(2, 2, 3, 4),
    mlp_ratios=(2, 2, 2, 2),
    recursions=3,
    decoder_width=16,
  ),
}


def run(model, pixels, output=None):
  session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
  return session.run(output, {"pixels": pixels.transpose(0, 3, 1, 2)})


@pytest.mark.parametrize(
  "family,norm", [("segformer", "imagenet"), ("pvtv2", "unit"), ("lvt", "unit")]
)
def test_onnx_gives_our_logits_and_labels(family, norm):
  spec = TINY[family]
  model = archs.build(family, spec, CLASSES)
  variables = random_variables(model, jnp.zeros((1, 64, 64, 3)), seed=1)
  graph = onnx_model(variables, family, spec, CLASSES, norm, argmax=True)
  onnx.checker.check_model(graph, full_check=True)
  assert graph.opset_import[0].version == OPSET >= 17
  assert {node.domain for node in graph.graph.node} == {""}  # no custom ops
  assert dict((p.key, p.value) for p in graph.metadata_props)["normalization"] == norm

  @jax.jit
  def ours(variables, pixels):
    logits = model.apply(variables, normalization.renormalize(pixels, norm, norm))["logits"]
    return logits, predictions_at(logits, pixels.shape[1:3])

  rng = np.random.default_rng(0)
  for height, width in ((64, 96), (96, 64)):
    pixels = rng.integers(0, 256, (2, height, width, 3), dtype=np.uint8)
    logits, labels = run(graph, pixels)
    want_logits, want_labels = jax.device_get(ours(variables, pixels))
    assert logits.shape == (2, CLASSES, height // 4, width // 4)
    assert labels.shape == (2, height, width) and labels.dtype == np.uint8
    scale = max(1.0, float(np.abs(want_logits).max()))  # random PVTv2 heads reach ~200
    np.testing.assert_allclose(logits, want_logits.transpose(0, 3, 1, 2), rtol=0, atol=1e-4 * scale)
    assert np.mean(labels == want_labels) > 0.999  # ties of float rounding may differ
