"""The evaluation step and its loop over a split: a confusion matrix accumulated on the
device, mIoU under either protocol.

Validation during training (transkd_jax/train.py), the teacher check, ``--mode=eval``
(transkd_jax/evaluate.py) and the eval benchmark all run ``make_eval_step`` and
``evaluate_split``. Two protocols, named next to every number:

- ``standard`` (SegFormer's, cityscapesScripts'): logits resized bilinearly
  (align_corners=False) to the labels' full resolution; a class absent from
  both prediction and label is left out of the mean.
- ``reference`` (the public TransKD code's): labels at 1/4 resolution,
  predictions at the logits' resolution; an absent class counts as IoU 0.
"""

from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from transkd_jax import data, normalization, sharding
from transkd_jax.data.classes import IGNORE
from transkd_jax.distill.losses import cross_entropy
from transkd_jax.models.resize import resize_bilinear, resize_nearest


def confusion_matrix(pred, label, num_classes: int, valid=None):
  """num_classes x num_classes counts (rows: label, columns: prediction).

  Pixels labelled ``IGNORE`` (or any id >= num_classes), and every pixel
  of an example whose ``valid`` flag is False (batch padding), are not counted.
  """
  label = label.astype(jnp.int32)
  keep = (label >= 0) & (label < num_classes)
  if valid is not None:
    keep &= valid.reshape((-1,) + (1,) * (label.ndim - 1))
  index = jnp.where(keep, label * num_classes + pred.astype(jnp.int32), num_classes**2)
  counts = jnp.bincount(index.reshape(-1), length=num_classes**2 + 1)
  return counts[:-1].reshape(num_classes, num_classes)


def predictions_at(logits, size, kernels: str = "native"):
  """Class ids at ``size`` (h, w): logits resized bilinearly (align_corners=False)."""
  return jnp.argmax(resize_bilinear(logits.astype(jnp.float32), size, kernels), axis=-1)


def predictions_at_sizes(logits, shape, sizes):
  """Class ids (B, *shape): example i's logits resized bilinearly to ``sizes[i]`` (h, w),
  placed top-left (the rest of ``shape`` is padding, labelled ignore).

  The same sampling as ``predictions_at`` (half-pixel centres, edges clamped),
  with per-example sizes that may be traced (one compile for all sizes).
  """

  def one(example_logits, size):
    scale = size.astype(jnp.float32) / jnp.array(example_logits.shape[:2], jnp.float32)
    return jax.image.scale_and_translate(
      example_logits,
      tuple(shape) + example_logits.shape[-1:],
      (0, 1),
      scale,
      jnp.zeros(2, jnp.float32),
      "linear",
      antialias=False,
    )

  return jnp.argmax(jax.vmap(one)(logits.astype(jnp.float32), sizes), axis=-1)


def labels_at_sizes(labels, shape, sizes):
  """Padded labels to ``shape`` by PyTorch's nearest rule on each true ``sizes[i]``."""

  def one(label, size):
    ys = jnp.floor(jnp.arange(shape[0]) * size[0] / shape[0]).astype(jnp.int32)
    xs = jnp.floor(jnp.arange(shape[1]) * size[1] / shape[1]).astype(jnp.int32)
    return label[ys[:, None], xs[None, :]]

  return jax.vmap(one)(labels, sizes)


def predictions_for(logits, labels, protocol: str, label_sizes=None, kernels: str = "native"):
  """(predictions, labels) compared under ``protocol``.

  ``standard``: logits resized to the labels' size (to each example's
  ``label_sizes`` when labels are padded). ``reference``: labels brought to the
  logits' size with PyTorch's nearest rule (a no-op when the pipeline already
  gives 1/4-resolution labels).
  """
  if protocol == "standard":
    if label_sizes is not None:
      return predictions_at_sizes(logits, labels.shape[1:3], label_sizes), labels
    return predictions_at(logits, labels.shape[1:3], kernels), labels
  return jnp.argmax(logits, axis=-1), resize_nearest(labels, logits.shape[1:3])


PROTOCOLS = ("standard", "reference")


def miou_from_confusion(cm: np.ndarray, protocol: str = "standard") -> Dict[str, object]:
  """{"miou", "per_class", "pixel_acc", "protocol"} of a confusion matrix.

  ``per_class`` is NaN for a class absent from both prediction and label
  under ``standard`` (left out of the mean) and 0 under ``reference``.
  """
  if protocol not in PROTOCOLS:
    raise ValueError(f"unknown evaluation protocol {protocol!r}; expected one of {PROTOCOLS}")
  cm = np.asarray(cm, np.float64)
  tp = np.diag(cm)
  union = cm.sum(0) + cm.sum(1) - tp
  with np.errstate(invalid="ignore", divide="ignore"):
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan if protocol == "standard" else 0.0)
  present = ~np.isnan(iou)
  return {
    "miou": float(np.mean(iou[present])) if present.any() else 0.0,
    "per_class": iou,
    "pixel_acc": float(tp.sum() / max(cm.sum(), 1.0)),
    "protocol": protocol,
  }


def make_eval_step(model, num_classes: int, protocol: str, mesh, input_norm):
  """eval_step(variables, batch) -> (confusion matrix, CE sum, labelled pixels, images).

  Every output is summed over the global batch (all processes) and replicated.

  ``batch``: "image", "label" and optionally "valid" (padding examples count
  nothing). The CE is over labels at the logits' resolution. ``input_norm`` =
  (the pipeline's normalisation, the model's): uint8 pixels are normalised to the
  model's on the device (transkd_jax/normalization.py).
  """

  def step(variables, batch):
    # Whole variables on every device (split ones are gathered), activations split by batch.
    variables = jax.lax.with_sharding_constraint(variables, sharding.replicated(mesh))
    images = normalization.renormalize(batch["image"], *input_norm)
    logits = model.apply(variables, images, train=False)["logits"]
    valid = batch.get("valid")
    labels = batch["label"]
    pred, compared = predictions_for(
      logits, labels, protocol, batch.get("label_size"), model.kernels
    )
    cm = confusion_matrix(pred, compared, num_classes, valid)
    small = labels
    if batch.get("label_size") is not None:
      small = labels_at_sizes(labels, logits.shape[1:3], batch["label_size"])
    elif labels.shape[1:3] != logits.shape[1:3]:
      small = resize_nearest(labels, logits.shape[1:3])
    if valid is not None:
      small = jnp.where(valid[:, None, None], small, IGNORE)
    pixels = jnp.sum(small != IGNORE)
    ce = cross_entropy(logits, small) * pixels
    images = labels.shape[0] if valid is None else jnp.sum(valid)
    return cm, ce, pixels, images

  return jax.jit(sharding.traced_on(mesh, step), out_shardings=sharding.replicated(mesh))


_LOW_BITS = 30  # a count on the device: high * 2**30 + low, both int32 (exact to 2**61)


def _carry(high, low):
  return high + (low >> _LOW_BITS), low & ((1 << _LOW_BITS) - 1)


@jax.jit
def _accumulate(totals, outputs):
  """The running sums plus one batch's eval-step outputs, on the device.

  ``totals``: ((cm high, cm low), CE sum, (pixels high, pixels low), images), or None
  for the first batch. Counts stay exact past int32's range (a split's pixels
  overflow it: 1525 Cityscapes images at full size are 3.2e9); the CE sum is float32.
  """
  cm, ce, pixels, images = outputs
  cm, pixels = cm.astype(jnp.int32), pixels.astype(jnp.int32)
  if totals is None:
    zero = jnp.zeros_like
    return _carry(zero(cm), cm), ce.astype(jnp.float32), _carry(zero(pixels), pixels), images
  (cm_high, cm_low), ce_sum, (px_high, px_low), count = totals
  return (
    _carry(cm_high, cm_low + cm),
    ce_sum + ce,
    _carry(px_high, px_low + pixels),
    count + images,
  )


def _exact(high_low) -> np.ndarray:
  high, low = (np.asarray(x, np.int64) for x in high_low)
  return (high << _LOW_BITS) + low


def evaluate_split(
  config, mesh, eval_step, variables, split: str, limit: int = 0, stop=None
) -> Optional[dict]:
  """Runs ``eval_step`` over ``split`` (its first ``limit`` images when > 0); scores +
  "loss", "num_images", "confusion". None when ``stop()``, asked before each batch (by
  every process: a preemption point), says to stop.

  The sums stay on the device (no host sync per batch: dispatch runs ahead of
  the device) and come to the host once, after the last batch.
  """
  totals, skipped = None, 0
  for batch in data.make_eval_iterator(config, split=split, limit=limit):
    if stop is not None and stop():
      return None
    local = {k: batch[k] for k in ("image", "label", "valid", "label_size") if k in batch}
    skipped += int(np.sum(batch.get("skipped", 0)))  # this process's, from the host batch
    totals = _accumulate(totals, eval_step(variables, sharding.global_batch(local, mesh)))
  if totals is None:  # an empty split
    cm, ce, pixels, images = np.zeros((config.num_classes,) * 2, np.int64), 0.0, 0, 0
  else:
    cm_parts, ce, pixel_parts, images = jax.device_get(totals)
    cm, pixels = _exact(cm_parts), int(_exact(pixel_parts))
  scores = miou_from_confusion(cm, config.eval_protocol)
  return {
    **scores,
    "loss": float(ce) / max(pixels, 1),
    "num_images": int(images),
    "skipped_bad_files": skipped,
    "confusion": cm,
  }
