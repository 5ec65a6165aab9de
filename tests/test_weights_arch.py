"""transkd_jax.weights.arch: --arch names and variant rows -> family, variant and names."""

import pytest

from transkd_jax.errors import UserError
from transkd_jax.models import MiTVariant, archs
from transkd_jax.models.lvt import LVT_VARIANTS
from transkd_jax.weights.arch import ACCEPTED, model_label, resolve_arch


def test_every_public_name_resolves_to_its_row():
  for family, row in archs.ARCHS.items():
    for variant, name in row.checkpoint_names.items():
      assert resolve_arch(name) == (family, row.variants[variant], variant, name)
      assert resolve_arch(name.upper())[3] == name
  assert resolve_arch("b3")[::2] == ("segformer", "b3")  # a bare MiT variant
  assert ACCEPTED == "mit_b0 .. mit_b5, pvt_v2_b0 .. pvt_v2_b5, lvt"


def test_rows_are_custom():
  row = MiTVariant((8, 16, 24, 32), (1, 1, 1, 1), (1, 1, 1, 1), 16)
  assert resolve_arch(row) == ("segformer", row, "custom", "custom SegFormer")
  assert resolve_arch(row, "pvtv2")[::3] == ("pvtv2", "custom PVTv2")
  assert resolve_arch(LVT_VARIANTS["lvt"])[3] == "custom LVT"
  with pytest.raises(ValueError):
    resolve_arch(row, "lvt")
  assert model_label("pvtv2", "pvt_v2_b0") == "PVTv2 pvt_v2_b0"


@pytest.mark.parametrize(
  "arch,needle",
  [
    ("mit_b9", "b9"),
    ("pvt_v2_b9", "b9"),
    ("lvt2", "lvt2"),
    ("swin_t", "unknown architecture"),
  ],
)
def test_unknown_names_list_the_accepted_ones(arch, needle):
  with pytest.raises(UserError, match=needle) as error:
    resolve_arch(arch)
  assert str(error.value).startswith(f"--arch={arch}: ") and ACCEPTED in str(error.value)
