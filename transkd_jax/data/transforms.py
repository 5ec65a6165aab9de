"""Per-example transforms (numpy + PIL), for grain's map / random_map.

``reference`` transforms (the public TransKD code, exactly, bugs included):
the image resized to ``image_size`` (PIL bilinear, as torchvision's Resize on
PIL images); the full-resolution label resized once, with PIL's NEAREST, to a
quarter of that (``int(h / 4 + 0.5)`` x ``int(w / 4 + 0.5)``: the logits'
resolution); a horizontal flip of both with p 0.5; then a shift by an integer
(tx, ty) in [-2, 2] of the image in image pixels and of the quarter-resolution
label by the same numbers in *label* pixels, so the label moves 4 times as far
as the image (``public_shift``: PIL's ``ImageOps.expand`` then ``crop``: a
positive shift uncovers a border filled with 0 in the image and 255, ignored, in
the label; a negative one crops past the edge, which fills both with 0: class 0,
road, in the label). Images leave the host as uint8 pixels; the steps scale them
to [0, 1] on the device (``normalization.renormalize``), without mean or std.

``aligned`` transforms: the same, but image and label are shifted together at
the input resolution, the uncovered label border is ignored (255), and only
then is the label brought to a quarter (PIL's NEAREST). Image and label stay
registered. For training that does not reproduce the public code's quirks.

Evaluation (both): the same image resize, no augmentation; labels at 1/4
resolution (``eval_label_resolution="quarter"``: the full-resolution label
resized once with PIL's NEAREST, as the public code's evaluation does) or at
the dataset's full resolution (``"full"``, for the standard protocol; images of
one batch must then share their size, as Cityscapes' do).

``mmseg`` protocol (SegFormer's Cityscapes config in mmsegmentation), train:
the image rescaled keeping its aspect ratio to ``scale`` (height, width) times
a ratio drawn uniformly from ``ratio_range`` (mmcv's ``imrescale``: factor
min(long target / long edge, short target / short edge); image bilinear as
cv2's INTER_LINEAR, i.e. half-pixel centres without antialiasing, rounded to
uint8; label nearest), a random crop of ``crop_size`` (up to 10 redraws until
no class covers ``cat_max_ratio`` or more of the crop's labelled pixels),
horizontal flip with p 0.5, mmseg's PhotoMetricDistortion, then padding to
``crop_size`` (image ``MEAN_PIXEL``, label 255); the ImageNet mean/std
normalisation runs in the step, on the device. Labels stay
at the crop's full resolution. Only the crop window of the rescaled image is
ever interpolated (about 35 ms per 1024x2048 example with a 512x1024 crop on
one CPU core).

mmseg's PhotoMetricDistortion works on uint8 images (its ``convert`` clips to
[0, 255] and casts back to uint8 after every step), so its HSV steps see
OpenCV's uint8 HSV: H in [0, 180) (2-degree units), S and V in [0, 255]. The
hue delta is an integer in [-18, 18) of those units (numpy's
``randint(-18, 18)``, i.e. -36..34 degrees) taken mod 180. We follow that:
``hsv_u8`` reproduces cv2's uint8 RGB->HSV with its fixed-point tables,
``rgb_u8`` cv2's HSV->RGB (float, rounded). ``rgb_to_hsv`` / ``hsv_to_rgb``
are cv2's float convention (H in degrees [0, 360), S in [0, 1], V in the
input's units), which mmdet's float variant of the transform uses.

Evaluation (``mmseg``): the image rescaled keeping its aspect ratio to fit
``scale`` (mmseg's test Resize, keep_ratio=True), normalised on the device; the label at
the dataset's full resolution (the ``standard`` evaluation protocol). Images of
one batch must then share their size (Cityscapes' all do).
"""

import functools

import numpy as np
from PIL import Image

from transkd_jax.data.labels import IGNORE
from transkd_jax.data.readers import check_key
from transkd_jax.errors import UserError
from transkd_jax.models.resize import nearest_indices
from transkd_jax.normalization import MEAN  # ImageNet's, on 0-255 pixels

MEAN_PIXEL = np.rint(MEAN).astype(np.uint8)  # uint8 padding that normalises to ~0 (mmseg's pad)


def resize_image(image: np.ndarray, size) -> np.ndarray:
  h, w = size
  if image.shape[:2] == (h, w):
    return image
  return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def resize_label(label: np.ndarray, size) -> np.ndarray:
  """Nearest neighbour with PyTorch's floor rule (never antialiased)."""
  h, w = size
  if label.shape == (h, w):
    return label
  return label[nearest_indices(label.shape[0], h)][:, nearest_indices(label.shape[1], w)]


@functools.lru_cache(maxsize=None)
def pil_nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source index of each output index under PIL's NEAREST resize.

  PIL samples at (i + 0.5) * in / out, accumulated in double precision one output
  pixel at a time (``x += scale``) and truncated. Written the same way here: the
  closed form floor((i + 0.5) * in / out) differs from PIL in a few columns at
  some sizes (e.g. 1920 -> 228).
  """
  scale = in_size / out_size
  steps = np.full(out_size, scale, np.float64)
  steps[0] = scale * 0.5
  return np.minimum(np.add.accumulate(steps).astype(np.int64), in_size - 1)


def resize_label_pil(label: np.ndarray, size) -> np.ndarray:
  """``Image.fromarray(label).resize((w, h), Image.NEAREST)``, without PIL."""
  h, w = size
  if label.shape == (h, w):
    return label
  return label[pil_nearest_indices(label.shape[0], h)][:, pil_nearest_indices(label.shape[1], w)]


def quarter_size(size):
  """The public code's label size for an input of ``size``: int(h / 4 + 0.5), int(w / 4 + 0.5)."""
  return int(size[0] / 4 + 0.5), int(size[1] / 4 + 0.5)


def public_shift(x: np.ndarray, dy: int, dx: int, fill) -> np.ndarray:
  """The public code's shift: ``ImageOps.expand(x, border=(dx, dy, 0, 0), fill=fill)``
  cropped back to (w, h) from the top left.

  Content moves by (dy, dx). A positive shift uncovers the top / left border,
  filled with ``fill``; a negative one crops past the bottom / right edge, which
  PIL fills with 0 whatever ``fill`` is.
  """
  h, w = x.shape[:2]
  out = np.zeros_like(x)
  out[: h + min(dy, 0), : w + min(dx, 0)] = fill  # inside the expanded canvas
  src_y = slice(max(-dy, 0), h - max(dy, 0))
  src_x = slice(max(-dx, 0), w - max(dx, 0))
  out[
    max(dy, 0) : max(dy, 0) + src_y.stop - src_y.start,
    max(dx, 0) : max(dx, 0) + src_x.stop - src_x.start,
  ] = x[src_y, src_x]
  return out


def shift(x: np.ndarray, dy: int, dx: int, fill) -> np.ndarray:
  """Translates by (dy, dx) pixels, filling the uncovered border with ``fill``."""
  out = np.full_like(x, fill)
  h, w = x.shape[:2]
  src_y = slice(max(-dy, 0), h - max(dy, 0))
  dst_y = slice(max(dy, 0), h - max(-dy, 0))
  src_x = slice(max(-dx, 0), w - max(dx, 0))
  dst_x = slice(max(dx, 0), w - max(-dx, 0))
  out[dst_y, dst_x] = x[src_y, src_x]
  return out


def quarter(label: np.ndarray) -> np.ndarray:
  """A label at a quarter of its size, by PIL's NEAREST (the public code's rule)."""
  return resize_label_pil(label, quarter_size(label.shape))


def reference_train(example, rng: np.random.Generator, size, max_shift: int = 2):
  """The public code's training transform, its misregistered shift included."""
  image = resize_image(example["image"], size)
  label = resize_label_pil(example["label"], quarter_size(size))
  if rng.uniform() < 0.5:
    image, label = image[:, ::-1], label[:, ::-1]
  dy, dx = (int(v) for v in rng.integers(-max_shift, max_shift + 1, size=2))
  image, label = public_shift(image, dy, dx, 0), public_shift(label, dy, dx, IGNORE)
  return {"image": image, "label": label.astype(np.int32)}


def aligned_train(example, rng: np.random.Generator, size, max_shift: int = 2):
  """As ``reference_train``, with image and label shifted together (and ignored borders)."""
  image = resize_image(example["image"], size)
  label = resize_label(example["label"], size)
  if rng.uniform() < 0.5:
    image, label = image[:, ::-1], label[:, ::-1]
  dy, dx = (int(v) for v in rng.integers(-max_shift, max_shift + 1, size=2))
  image, label = shift(image, dy, dx, 0), shift(label, dy, dx, IGNORE)
  return {"image": image, "label": quarter(label).astype(np.int32)}


def reference_eval(example, size, label_resolution: str = "quarter"):
  image = resize_image(example["image"], size)
  if label_resolution == "quarter":  # one step from full resolution, as the public code
    label = resize_label_pil(example["label"], quarter_size(size))
  elif label_resolution == "full":
    label = example["label"]
  else:
    raise ValueError(
      f"config.data.eval_label_resolution must be 'quarter' or 'full', got {label_resolution!r}"
    )
  return {"image": image, "label": label.astype(np.int32)}


# --- mmseg protocol -------------------------------------------------------------------------


def rescale_size(shape, scale, ratio: float = 1.0):
  """mmcv's imrescale size: (h, w) fitted to ``scale`` * ratio keeping the aspect ratio."""
  h, w = shape[:2]
  target = int(scale[0] * ratio), int(scale[1] * ratio)  # mmseg truncates the scaled target
  factor = min(max(target) / max(h, w), min(target) / min(h, w))
  return int(h * factor + 0.5), int(w * factor + 0.5)


def linear_taps(in_size: int, out_size: int, start: int = 0, count=None):
  """cv2 INTER_LINEAR taps (lo, hi, frac) of outputs start .. start + count - 1.

  src = (dst + 0.5) * in / out - 0.5 clamped to [0, in - 1] (PyTorch's bilinear,
  align_corners=False, too). Not cached: random scales would fill a cache.
  """
  count = out_size - start if count is None else count
  dst = np.arange(start, start + count, dtype=np.float64)
  src = np.clip((dst + 0.5) * (in_size / out_size) - 0.5, 0.0, in_size - 1)
  lo = np.floor(src).astype(np.int64)
  return lo, np.minimum(lo + 1, in_size - 1), (src - lo).astype(np.float32)


def resize_window(image: np.ndarray, size, top: int = 0, left: int = 0, window=None):
  """``window`` (h, w) at (top, left) of ``image`` resized bilinearly to ``size``.

  cv2's INTER_LINEAR (half-pixel centres, no antialiasing, edges clamped) rounded
  to uint8, computed only for the rows and columns of the window.
  """
  window = size if window is None else window
  if tuple(size) == image.shape[:2]:
    return image[top : top + window[0], left : left + window[1]]
  r0, r1, wr = linear_taps(image.shape[0], size[0], top, window[0])
  c0, c1, wc = linear_taps(image.shape[1], size[1], left, window[1])
  lo, hi = int(c0[0]), int(c1[-1]) + 1  # the source columns the window reads
  src = image[:, lo:hi]
  a, b = src[r0].astype(np.float32), src[r1].astype(np.float32)
  rows = a + (b - a) * wr[:, None, None]
  a, b = rows[:, c0 - lo], rows[:, c1 - lo]
  out = a + (b - a) * wc[None, :, None]
  return np.rint(out).clip(0, 255).astype(np.uint8)


def label_window(label: np.ndarray, size, top: int = 0, left: int = 0, window=None):
  """``window`` of ``label`` resized to ``size`` by nearest neighbour (cv2's floor rule)."""
  window = size if window is None else window
  rows = nearest_indices(label.shape[0], size[0])[top : top + window[0]]
  cols = nearest_indices(label.shape[1], size[1])[left : left + window[1]]
  return label[rows][:, cols]


def crop_is_balanced(label: np.ndarray, cat_max_ratio: float) -> bool:
  """mmseg's test: >= 2 classes and none covering cat_max_ratio of the labelled pixels."""
  counts = np.bincount(label.ravel(), minlength=IGNORE + 1)
  counts = np.delete(counts, IGNORE)
  counts = counts[counts > 0]
  return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def random_crop_box(
  label_at, shape, crop_size, rng: np.random.Generator, cat_max_ratio: float = 1.0, tries: int = 10
):
  """(top, left, (h, w)) of a crop of an image of ``shape``, as mmseg's RandomCrop.

  ``label_at(top, left, window)`` gives the crop's label; while a crop fails
  ``crop_is_balanced`` another is drawn, at most ``tries`` times (the last drawn
  one is kept). ``cat_max_ratio`` >= 1 skips the test.
  """
  window = min(crop_size[0], shape[0]), min(crop_size[1], shape[1])

  def draw():
    return (
      int(rng.integers(0, shape[0] - window[0] + 1)),
      int(rng.integers(0, shape[1] - window[1] + 1)),
    )

  top, left = draw()
  if cat_max_ratio < 1.0:
    for _ in range(tries):
      if crop_is_balanced(label_at(top, left, window), cat_max_ratio):
        break
      top, left = draw()
  return top, left, window


def _channels(x: np.ndarray, dtype):
  return tuple(np.ascontiguousarray(x[..., c], dtype=dtype) for c in range(3))


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
  """cv2's float RGB->HSV: H in degrees [0, 360), S in [0, 1], V in the input's units."""
  r, g, b = _channels(rgb, np.float32)
  v = np.maximum(np.maximum(r, g), b)
  diff = v - np.minimum(np.minimum(r, g), b)
  eps = np.float32(np.finfo(np.float32).eps)
  s = diff / (np.abs(v) + eps)
  scale = np.float32(60.0) / (diff + eps)
  h = np.where(
    v == r, (g - b) * scale, np.where(v == g, (b - r) * scale + 120, (r - g) * scale + 240)
  )
  h = np.where(h < 0, h + 360, h)
  return np.stack([h, s, v], axis=-1)


def _hsv_to_rgb(h, s, v, hue_range: float) -> np.ndarray:
  h = h * np.float32(6.0 / hue_range)
  out = np.empty(h.shape + (3,), np.float32)
  for c, n in enumerate((5, 3, 1)):
    k = np.mod(h + n, 6)
    w = np.clip(np.minimum(k, 4 - k), 0, 1)
    out[..., c] = v * (1 - s * w)
  return out


def hsv_to_rgb(hsv: np.ndarray, hue_range: float = 360.0) -> np.ndarray:
  """cv2's float HSV->RGB (H in [0, ``hue_range``), S in [0, 1]); V's units are kept.

  Per channel v * (1 - s * w), w = clip(min(k, 4 - k), 0, 1), k = (n + 6 h / hue_range)
  mod 6 with n = 5, 3, 1 for r, g, b: cv2's per-sector v, p, q, t without a gather.
  """
  return _hsv_to_rgb(*_channels(hsv, np.float32), hue_range)


def _tables():
  i = np.arange(256, dtype=np.float64)
  with np.errstate(divide="ignore"):
    s_div = np.where(i > 0, np.rint((255 << 12) / i), 0).astype(np.int32)
    h_div = np.where(i > 0, np.rint((180 << 12) / (6 * i)), 0).astype(np.int32)
  return s_div, h_div


_S_DIV, _H_DIV = _tables()  # cv2's fixed-point (12-bit) division tables for uint8 HSV


def hsv_u8(rgb: np.ndarray) -> np.ndarray:
  """cv2's uint8 RGB->HSV exactly: H in [0, 180) (2-degree units), S and V in [0, 255]."""
  r, g, b = _channels(rgb, np.int32)
  v = np.maximum(np.maximum(r, g), b)
  diff = v - np.minimum(np.minimum(r, g), b)
  s = (diff * _S_DIV[v] + (1 << 11)) >> 12
  h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
  h = (h * _H_DIV[diff] + (1 << 11)) >> 12
  h += np.where(h < 0, 180, 0)
  return np.stack([h, s, v], axis=-1).astype(np.uint8)


def rgb_u8(hsv: np.ndarray) -> np.ndarray:
  """cv2's uint8 HSV->RGB: HSV in cv2's uint8 units, RGB rounded to uint8."""
  h, s, v = _channels(hsv, np.float32)
  rgb = _hsv_to_rgb(h, s * np.float32(1 / 255), v * np.float32(1 / 255), 180.0)
  return np.rint(rgb * 255).clip(0, 255).astype(np.uint8)


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
  """mmseg's ``convert``: x * alpha + beta in float32, clipped to [0, 255], cast to uint8."""
  lut = np.clip(np.arange(256, dtype=np.float32) * np.float32(alpha) + np.float32(beta), 0, 255)
  return lut.astype(np.uint8)[x]


def photometric_distortion(
  image: np.ndarray,
  rng: np.random.Generator,
  brightness_delta: float = 32,
  contrast_range=(0.5, 1.5),
  saturation_range=(0.5, 1.5),
  hue_delta: int = 18,
) -> np.ndarray:
  """mmseg's PhotoMetricDistortion on a uint8 RGB image (each step with p 0.5).

  Brightness, then contrast either first (mode 1) or last (mode 0), saturation and
  hue in between, each in its own uint8 HSV round trip, as mmseg does.
  """
  if rng.integers(2):
    image = _convert(image, beta=rng.uniform(-brightness_delta, brightness_delta))
  mode = rng.integers(2)

  def contrast(img):
    if rng.integers(2):
      return _convert(img, alpha=rng.uniform(*contrast_range))
    return img

  if mode == 1:
    image = contrast(image)
  if rng.integers(2):
    hsv = hsv_u8(image)
    hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*saturation_range))
    image = rgb_u8(hsv)
  if rng.integers(2):
    hsv = hsv_u8(image)
    hsv[..., 0] = (hsv[..., 0].astype(np.int32) + int(rng.integers(-hue_delta, hue_delta))) % 180
    image = rgb_u8(hsv)
  if mode == 0:
    image = contrast(image)
  return image


def pad_to(x: np.ndarray, size, fill) -> np.ndarray:
  """Pads bottom and right to ``size`` (h, w) with ``fill`` (mmcv's impad)."""
  h, w = x.shape[:2]
  if (h, w) == tuple(size):
    return x
  out = np.full((size[0], size[1]) + x.shape[2:], fill, x.dtype)
  out[:h, :w] = x
  return out


def mmseg_train(
  example,
  rng: np.random.Generator,
  crop_size,
  scale=(1024, 2048),
  ratio_range=(0.5, 2.0),
  cat_max_ratio: float = 0.75,
):
  """mmseg's train pipeline; {"image": uint8 crop_size x 3, "label": int32 crop_size}.

  Normalisation (ImageNet mean/std) is left to the step, on the device. Padding
  (crops larger than the rescaled image) is ``MEAN_PIXEL``, which normalises to
  within 0.01 of mmseg's 0 (it pads after normalising).
  """
  image, label = example["image"], example["label"]
  ratio = rng.uniform() * (ratio_range[1] - ratio_range[0]) + ratio_range[0]
  size = rescale_size(image.shape, scale, ratio)
  top, left, window = random_crop_box(
    lambda t, x0, win: label_window(label, size, t, x0, win), size, crop_size, rng, cat_max_ratio
  )
  image = resize_window(image, size, top, left, window)
  label = label_window(label, size, top, left, window)
  if rng.uniform() < 0.5:
    image, label = image[:, ::-1], label[:, ::-1]
  image = photometric_distortion(image, rng)
  return {
    "image": pad_to(image, crop_size, MEAN_PIXEL),
    "label": pad_to(label, crop_size, IGNORE).astype(np.int32),
  }


def mmseg_eval(example, scale=(1024, 2048)):
  """mmseg's test pipeline: rescaled to fit ``scale`` (uint8); label at full size."""
  image = example["image"]
  image = resize_window(image, rescale_size(image.shape, scale))
  return {"image": image, "label": example["label"].astype(np.int32)}


# --- choosing the transforms ---------------------------------------------------------------------

TRANSFORMS = ("reference", "aligned", "mmseg")  # the transform sets (config.data.transforms)
EVAL_LABEL_RESOLUTIONS = ("quarter", "full")  # config.data.eval_label_resolution, or ""


def _pair(data_config, key, increasing=False):
  value = data_config[key]
  try:
    a, b = (float(v) for v in value)
  except (TypeError, ValueError):
    raise UserError(f"config.data.{key} must be two numbers, got {value!r}") from None
  if not (0 < a <= b if increasing else a > 0 and b > 0):
    raise UserError(
      f"config.data.{key}={tuple(value)!r} must be positive"
      + (" and increasing" if increasing else "")
    )
  return a, b


def mmseg_settings(data_config) -> dict:
  """The ``mmseg_*`` keys of ``config.data``, checked: {"scale", "ratio_range", "cat_max_ratio"}."""
  scale = tuple(int(v) for v in _pair(data_config, "mmseg_scale"))
  try:
    cat_max_ratio = float(data_config.mmseg_cat_max_ratio)
  except (TypeError, ValueError):
    raise UserError(
      f"config.data.mmseg_cat_max_ratio must be a number, got {data_config.mmseg_cat_max_ratio!r}"
    ) from None
  if not cat_max_ratio > 0:
    raise UserError(
      f"config.data.mmseg_cat_max_ratio={cat_max_ratio!r} must be > 0 (>= 1 turns the test off)"
    )
  ratio_range = _pair(data_config, "mmseg_ratio_range", increasing=True)
  return {"scale": scale, "ratio_range": ratio_range, "cat_max_ratio": cat_max_ratio}


def check_keys(data_config) -> None:
  """The transform keys of ``config.data`` (transforms, eval_label_resolution, ``mmseg_*``),
  checked at start-up; ``mmseg_*`` by the code that reads them (``mmseg_settings``)."""
  check_key(
    data_config.transforms in TRANSFORMS,
    "transforms",
    f"one of {TRANSFORMS}",
    data_config.transforms,
  )
  check_key(
    data_config.eval_label_resolution in ("",) + EVAL_LABEL_RESOLUTIONS,
    "eval_label_resolution",
    "'quarter', 'full' or '' (follows eval_protocol)",
    data_config.eval_label_resolution,
  )
  mmseg_settings(data_config)


def transforms_of(config) -> str:
  """``config.data.transforms``: "reference" (the public code's), "aligned" or "mmseg"."""
  name = config.data.transforms
  if name not in TRANSFORMS:
    raise UserError(
      f"config.data.transforms={name!r} is not known; expected one of {', '.join(TRANSFORMS)}"
    )
  return name


def train_transform(config):
  """fn(example, rng) for ``config.data.transforms``, cropping/resizing to config.image_size."""
  size = tuple(config.image_size)
  name = transforms_of(config)
  if name == "mmseg":
    return functools.partial(mmseg_train, crop_size=size, **mmseg_settings(config.data))
  return functools.partial(reference_train if name == "reference" else aligned_train, size=size)


def eval_transform(config):
  """fn(example) for ``config.data.transforms`` (the model sees what it trained on)."""
  if transforms_of(config) == "mmseg":
    return functools.partial(mmseg_eval, scale=mmseg_settings(config.data)["scale"])
  return functools.partial(
    reference_eval, size=tuple(config.image_size), label_resolution=eval_label_resolution(config)
  )


def eval_label_resolution(config) -> str:
  """``config.data.eval_label_resolution``, or when empty the one ``config.eval_protocol``
  scores at: "full" for ``standard``, "quarter" for ``reference``."""
  chosen = config.data.eval_label_resolution
  if chosen:
    return chosen
  return "quarter" if config.eval_protocol == "reference" else "full"


def eval_image(image: np.ndarray, config, size=None) -> np.ndarray:
  """The uint8 image the model sees at evaluation under ``config.data.transforms``
  (normalised on the device).

  ``size`` (h, w) overrides the protocol's resize (``None``: the protocol's
  own: ``config.image_size`` for reference, fit to ``mmseg_scale`` for mmseg).
  """
  if transforms_of(config) == "mmseg":
    if size is None:
      size = rescale_size(image.shape, mmseg_settings(config.data)["scale"])
    return resize_window(image, size)
  size = tuple(config.image_size) if size is None else size
  return resize_image(image, size)


def image_fill(config) -> np.ndarray:
  """The uint8 pixel padding takes under ``config.data.transforms`` (mmseg pads at the mean)."""
  return MEAN_PIXEL if transforms_of(config) == "mmseg" else np.zeros(3, np.uint8)
