"""transkd_jax.weights.infer: family and variant read off Flax trees and state dicts alike
(shapes only: abstract evaluation, empty arrays)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from transkd_jax.errors import UserError
from transkd_jax.models import MiTVariant, PVTv2, SegFormer, archs, get_variant
from transkd_jax.weights.infer import guess_arch, infer_model, tree_family
from transkd_jax.weights.layouts import torch_name, torch_shape
from transkd_jax.weights.names import public_to_hf

# No row of the variant table: the heads (not the table's 1, 2, 5, 8) must be given.
TINY = MiTVariant((8, 16, 24, 32), (1, 2, 1, 1), (1, 2, 3, 4), 16)


def _shapes(model):
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))


def _public(family, variant, num_classes=19):
  """The public state dict of a model, as empty arrays of the right shapes."""
  flat = traverse_util.flatten_dict(_shapes(archs.build(family, variant, num_classes)))
  return {
    torch_name(path, family): np.empty(torch_shape(leaf.shape), np.float32)
    for path, leaf in flat.items()
  }


@pytest.mark.parametrize("name", ["b0", "b1", "b2", "b5"])
def test_table_variants_are_recognised(name):
  shapes = _shapes(SegFormer(name, 19))
  _, found, spec, classes = infer_model(shapes)
  assert (found, spec, classes) == (f"mit_{name}", get_variant(name), 19)


def test_custom_variant_needs_heads():
  variables = _shapes(SegFormer(TINY, 5))
  with pytest.raises(UserError, match="--heads") as error:
    infer_model(variables)
  assert "closest mit_b0" in str(error.value) and "channels (8, 16, 24, 32)" in str(error.value)
  with pytest.raises(UserError, match="dividing"):
    infer_model(variables, (1, 2, 5, 8))  # 5 heads do not divide 24 channels
  family, name, spec, classes = infer_model(variables, (1, 2, 3, 4))
  assert (family, name, spec, classes) == ("segformer", "", TINY, 5)


@pytest.mark.parametrize("name", ["b0", "b5"])  # b5: Mix-FFN ratio 4 throughout
def test_pvtv2_table_variants_are_recognised(name):
  shapes = _shapes(PVTv2(name, 7))
  assert tree_family(shapes) == "pvtv2"
  family, arch, spec, classes = infer_model(shapes)
  assert (family, arch, classes) == ("pvtv2", f"pvt_v2_{name}", 7)


def test_a_pvtv2_off_the_table_is_refused():
  row = MiTVariant((32, 64, 160, 256), (2, 2, 1, 2), (1, 2, 5, 8), 256, (8, 8, 4, 4))
  shapes = _shapes(PVTv2(row, 19))
  with pytest.raises(UserError, match=r"closest pvt_v2_b0 differs in depths \(2, 2, 1, 2\)"):
    infer_model(shapes)


def test_the_record_and_heads_are_checked():
  lvt = _shapes(archs.build("lvt", "lvt", 19))
  assert tree_family(lvt) == "lvt"
  assert infer_model(lvt, recorded=("lvt", "lvt"))[:2] == ("lvt", "lvt")
  with pytest.raises(UserError, match="says pvtv2 but its parameters are a lvt's"):
    infer_model(lvt, recorded=("pvtv2", "b0"))
  with pytest.raises(UserError, match="only SegFormer variants need heads"):
    infer_model(lvt, (1, 2, 5, 8))


@pytest.mark.parametrize(
  "family,variant,arch",
  [("segformer", "b2", "mit_b2"), ("pvtv2", "b1", "pvt_v2_b1"), ("lvt", "lvt", "lvt")],
)
def test_state_dicts_of_every_layout_are_recognised(family, variant, arch):
  public = _public(family, variant, 20)
  bare = {k: v for k, v in public.items() if not k.startswith(archs.ARCHS[family].public.decoder)}
  wrapped = {f"module.student.{k}": v for k, v in public.items()}
  assert infer_model(public)[:2] == (family, arch) and infer_model(public)[3] == 20
  assert infer_model(bare)[3] is None  # a bare encoder: no classes
  for state in (public, bare, wrapped) + ((public_to_hf(public),) if family == "segformer" else ()):
    assert guess_arch(state) == arch


def test_unclear_state_dicts_guess_nothing():
  assert guess_arch({}) == ""
  assert guess_arch({"fc.weight": np.empty((3, 4))}) == ""
  custom = {
    torch_name(path, "segformer"): np.empty(torch_shape(leaf.shape))
    for path, leaf in traverse_util.flatten_dict(_shapes(SegFormer(TINY, 5))).items()
  }
  assert guess_arch(custom) == ""  # no row: its heads are unknown
