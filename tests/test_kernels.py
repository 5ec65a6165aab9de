"""models/kernels.py: the ops' two forms (cpu, native) against each other and a plain
reference, values and gradients."""

import jax
import numpy as np
import pytest

from transkd_jax.models import kernels


def _reference_depthwise(x, kernel, dilation):
  """3x3 depthwise conv, dilation = padding = d, as one plain grouped lax convolution."""
  d = dilation
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    (1, 1),
    ((d, d), (d, d)),
    rhs_dilation=(d, d),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=x.shape[-1],
  )


@pytest.mark.parametrize("dilation", [1, 2, 3, 5])
@pytest.mark.parametrize("shape", [(2, 9, 7, 6), (1, 3, 4, 2), (2, 16, 12, 4)])
def test_depthwise_forms_and_their_gradients_equal_a_plain_convolution(shape, dilation):
  """Both forms, and the cpu form's written-out VJP, equal lax's grouped convolution and its
  autodiff; (1, 3, 4, 2) at dilation 3 or 5 has taps that fall wholly in the padding."""
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], shape)
  kernel = jax.random.normal(keys[1], (3, 3, 1, shape[-1]))
  g = jax.random.normal(keys[2], shape)
  ref, vjp_ref = jax.vjp(lambda a, k: _reference_depthwise(a, k, dilation), x, kernel)
  assert ref.shape == shape
  for form in kernels.FORMS:
    op = jax.jit(lambda a, k, form=form: kernels.depthwise3x3(a, k, form, dilation))
    out, vjp = jax.vjp(op, x, kernel)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5, err_msg=form)
    for name, a, b in zip(("dx", "dkernel"), vjp(g), vjp_ref(g)):
      assert a.shape == b.shape
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=f"{form} {name}")


def test_dilation_one_is_the_default():
  x = jax.random.normal(jax.random.key(0), (1, 5, 6, 3))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 3))
  np.testing.assert_array_equal(
    kernels.shifted_depthwise3x3(x, kernel), kernels.shifted_depthwise3x3(x, kernel, 1)
  )
