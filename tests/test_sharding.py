"""The mesh and its errors."""

import pytest

from transkd_jax import sharding


def test_mesh_shape_errors_name_the_key():
  with pytest.raises(ValueError, match="config.mesh_shape"):
    sharding.make_mesh((3, -1))
  with pytest.raises(ValueError, match="config.mesh_shape"):
    sharding.make_mesh((-1, -1))
