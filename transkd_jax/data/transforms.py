"""Per-example transforms (numpy + PIL), for grain's map / random_map.

``reference`` protocol (the public TransKD code): resize to ``image_size``
(PIL bilinear, as torchvision's Resize on PIL images), horizontal flip with p
0.5, a random shift of -2..2 px (image padded with 0, label with 255), image
scaled to [0, 1] without normalisation, labels to 1/4 resolution by nearest
neighbour with PyTorch's rule (source index floor(i * in / out)).

Evaluation: the same resize, no augmentation; labels at 1/4 resolution
(``eval_label_resolution="quarter"``) or at the dataset's full resolution
(``"full"``, for the standard protocol; images of one batch must then share
their size, as Cityscapes' do).
"""

import numpy as np
from PIL import Image

from transkd_jax.data.classes import IGNORE
from transkd_jax.models.resize import nearest_indices


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
  h, w = label.shape
  return resize_label(label, (h // 4, w // 4))


def reference_train(example, rng: np.random.Generator, size, max_shift: int = 2):
  image = resize_image(example["image"], size)
  label = resize_label(example["label"], size)
  if rng.uniform() < 0.5:
    image, label = image[:, ::-1], label[:, ::-1]
  dy, dx = rng.integers(-max_shift, max_shift + 1, size=2)
  image, label = shift(image, int(dy), int(dx), 0), shift(label, int(dy), int(dx), IGNORE)
  return {"image": image.astype(np.float32) / 255.0, "label": quarter(label).astype(np.int32)}


def reference_eval(example, size, label_resolution: str = "quarter"):
  image = resize_image(example["image"], size)
  if label_resolution == "quarter":
    label = quarter(resize_label(example["label"], size))
  elif label_resolution == "full":
    label = example["label"]
  else:
    raise ValueError(f"config.data.eval_label_resolution must be 'quarter' or 'full', got "
                     f"{label_resolution!r}")
  return {"image": image.astype(np.float32) / 255.0, "label": label.astype(np.int32)}
