"""models/kernels.py: the ops' forms (cpu, native, tpu, gpu) against each other and a plain
reference, values and gradients."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transkd_jax.models import kernels, resize


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


def test_the_forms_resolve_from_the_platform_unless_forced():
  assert [kernels.resolve("auto", p) for p in ("cpu", "tpu", "rocm")] == ["cpu", "tpu", "native"]
  assert kernels.resolve("auto", "gpu", "9.0") == "gpu"  # more in test_gpu_form.py
  assert [kernels.resolve(f, "tpu") for f in ("cpu", "native", "tpu")] == ["cpu", "native", "tpu"]
  with pytest.raises(ValueError, match="needs TPU devices; these are gpu devices"):
    kernels.resolve("tpu", "gpu")
  with pytest.raises(ValueError, match="config.kernels must be one of"):
    kernels.resolve("flash", "tpu")


def test_splash_takes_sequences_in_blocks_of_128():
  assert kernels.splash_fits(32768, 512) and kernels.splash_fits(384, 128)  # MiT at 512x1024
  assert not kernels.splash_fits(2048, 32)  # stage 1 at 128x256: 4 x 8 keys
  assert not kernels.splash_fits(200, 128)
  assert [kernels._splash_block(n) for n in (32768, 768, 384, 100)] == [512, 256, 128, None]


def test_splash_attention_and_its_gradient_equal_dot_product_attention():
  """The tpu form's kernel, run by Pallas' interpreter on the CPU: 256 queries (two blocks
  of 128) over 128 keys, two heads, MiT's head_dim 32; values and all three gradients."""
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (2, 256, 2, 32)) * 2
  k = jax.random.normal(keys[1], (2, 128, 2, 32))
  v = jax.random.normal(keys[2], (2, 128, 2, 32))
  g = jax.random.normal(keys[3], q.shape)
  splash = jax.jit(lambda q, k, v: kernels.splash_attention(q, k, v, interpret=True))
  out, vjp = jax.vjp(splash, q, k, v)
  ref, vjp_ref = jax.vjp(jax.nn.dot_product_attention, q, k, v)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  for name, a, b in zip(("dq", "dk", "dv"), vjp(g), vjp_ref(g)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)


def test_the_tpu_form_runs_native_attention_where_splash_does_not_fit():
  """Short sequences (a tiny model, 32 keys) take jax.nn.dot_product_attention: no kernel,
  so the tpu form's modules also run on a CPU at such sizes."""
  keys = jax.random.split(jax.random.key(1), 3)
  q, k, v = (jax.random.normal(key, (1, n, 2, 8)) for key, n in zip(keys, (64, 32, 32)))
  np.testing.assert_array_equal(
    kernels.attention(q, k, v, "tpu"), jax.nn.dot_product_attention(q, k, v)
  )


@pytest.mark.parametrize(
  "channels, size, stride, padding, hw",
  [
    (3, 7, 4, 3, (32, 64)),  # MiT's first patch embedding
    (3, 3, 2, 1, (16, 24)),  # the later embeddings' geometry, on an image
    (1, 5, 4, 1, (16, 20)),  # low padding under a block: zero taps before the kernel
  ],
)
def test_space_to_depth_conv_and_its_gradients_equal_the_strided_conv(
  channels, size, stride, padding, hw
):
  """The TPU form of an image's patch-embedding conv: the input folded into stride x stride
  blocks and a stride-1 conv over them, the kernel zero-padded to whole blocks. The same
  values, and the same gradients for the input and the kernel, as the strided conv."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, *hw, channels)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(size, size, channels, 16)), jnp.float32)
  numbers = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))
  pads = ((padding, padding), (padding, padding))

  def out(conv):
    def f(x, kernel):
      y = conv(x, kernel, (stride, stride), pads, dimension_numbers=numbers)
      return jnp.sum(jnp.sin(y)), y

    return jax.grad(f, argnums=(0, 1), has_aux=True)(x, kernel)

  with jax.default_matmul_precision("highest"):
    (dx, dk), y = out(kernels.space_to_depth_conv)
    (dx_ref, dk_ref), y_ref = out(jax.lax.conv_general_dilated)
  assert y.shape == y_ref.shape
  # Sums of up to 147 products of unit normals, added in another order: float32 rounding.
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=2e-4)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=2e-4)
  np.testing.assert_allclose(dk, dk_ref, rtol=1e-5, atol=2e-4)


def test_patch_conv_folds_only_an_image_into_blocks():
  """``tpu``: a strided conv over an image (3 channels) is computed over blocks (its compiled
  conv has stride 1); over a feature map (32 channels), and in every other form, it is the
  plain strided conv."""
  x_image = jnp.zeros((1, 32, 64, 3))
  x_map = jnp.zeros((1, 32, 64, 32))

  def strides_of(form, x):
    kernel = jnp.zeros((7, 7, x.shape[-1], 8))
    numbers = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))
    conv = kernels.patch_conv(form)
    text = (
      jax.jit(lambda x, k: conv(x, k, (4, 4), ((3, 3), (3, 3)), dimension_numbers=numbers))
      .lower(x, kernel)
      .as_text()
    )
    return re.findall(r"window = \{stride = \[(\d+), (\d+)\]", text)

  assert strides_of("tpu", x_image) == [("1", "1")]
  assert strides_of("tpu", x_map) == [("4", "4")]
  assert strides_of("native", x_image) == [("4", "4")] == strides_of("cpu", x_image)


@pytest.mark.parametrize("hw, ratio", [((32, 64), 8), ((18, 21), 4)])
def test_patch_matmul_forms_and_their_gradients_equal_the_strided_conv(hw, ratio):
  """MiT's spatial reduction (kernel = stride, trailing rows and columns that fill no
  patch dropped): the reshape-and-matmul form (cpu, native) and the strided conv (tpu)
  against ``jax.lax.conv_general_dilated``, values and both gradients."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, *hw, 8)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(ratio, ratio, 8, 6)), jnp.float32)

  def reference(x, kernel):
    return jax.lax.conv_general_dilated(
      x, kernel, (ratio, ratio), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )

  def out(fn):
    f = lambda x, k: (jnp.sum(jnp.sin(fn(x, k))), fn(x, k))  # noqa: E731
    return jax.grad(f, argnums=(0, 1), has_aux=True)(x, kernel)

  with jax.default_matmul_precision("highest"):
    (dx_ref, dk_ref), y_ref = out(reference)
    for form in kernels.FORMS:
      (dx, dk), y = out(functools.partial(kernels.patch_matmul, form=form))
      assert y.shape == y_ref.shape == (2, hw[0] // ratio, hw[1] // ratio, 6)
      for got, want in ((y, y_ref), (dx, dx_ref), (dk, dk_ref)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-4, err_msg=form)


def test_the_resized_sum_of_the_heads_maps_and_its_gradients_equal_the_sum_of_resizes():
  """The SegFormer head's upsampled sum of its four stage maps (1/32 ... 1/4 of 64 x 128):
  ``resize_bilinear_sum`` in each form against the sum of per-map ``resize_bilinear`` by
  the cpu form, values and the gradient of every map; the cpu form is that sum itself."""
  rng = np.random.default_rng(2)
  maps = [
    jnp.asarray(rng.normal(size=(2, h, w, 8)), jnp.float32)
    for h, w in ((2, 4), (4, 8), (8, 16), (16, 32))
  ]

  def out(fn):
    f = lambda maps: (jnp.sum(jnp.sin(fn(maps))), fn(maps))  # noqa: E731
    return jax.grad(f, has_aux=True)(maps)

  def separately(maps):
    return sum(resize.resize_bilinear(m, (16, 32), "cpu") for m in maps)

  with jax.default_matmul_precision("highest"):
    grads_ref, y_ref = out(separately)
    for form in kernels.FORMS:
      grads, y = out(functools.partial(resize.resize_bilinear_sum, size=(16, 32), kernels=form))
      np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5, err_msg=form)
      for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5, err_msg=form)
