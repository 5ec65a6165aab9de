"""Segmentation metrics: a confusion matrix accumulated on device, then mIoU.

Two protocols, named next to every number:

- ``standard`` (SegFormer's, cityscapesScripts'): logits resized bilinearly
  (align_corners=False) to the labels' full resolution; a class absent from
  both prediction and label is left out of the mean.
- ``reference`` (the public TransKD code's): labels at 1/4 resolution,
  predictions at the logits' resolution; an absent class counts as IoU 0.
"""

from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

from transkd_jax.distill.losses import IGNORE_LABEL
from transkd_jax.models.resize import resize_bilinear, resize_nearest


def confusion_matrix(pred, label, num_classes: int, valid=None):
  """num_classes x num_classes counts (rows: label, columns: prediction).

  Pixels labelled ``IGNORE_LABEL`` (or any id >= num_classes), and every pixel
  of an example whose ``valid`` flag is False (batch padding), are not counted.
  """
  label = label.astype(jnp.int32)
  keep = (label >= 0) & (label < num_classes)
  if valid is not None:
    keep &= valid.reshape((-1,) + (1,) * (label.ndim - 1))
  index = jnp.where(keep, label * num_classes + pred.astype(jnp.int32), num_classes ** 2)
  counts = jnp.bincount(index.reshape(-1), length=num_classes ** 2 + 1)
  return counts[:-1].reshape(num_classes, num_classes)


def predictions_at(logits, size):
  """Class ids at ``size`` (h, w): logits resized bilinearly (align_corners=False)."""
  return jnp.argmax(resize_bilinear(logits.astype(jnp.float32), size), axis=-1)


def predictions_for(logits, labels, protocol: str):
  """(predictions, labels) compared under ``protocol``.

  ``standard``: logits resized to the labels' size. ``reference``: labels
  brought to the logits' size with PyTorch's nearest rule (a no-op when the
  pipeline already gives 1/4-resolution labels).
  """
  if protocol == "standard":
    return predictions_at(logits, labels.shape[1:3]), labels
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
  return {"miou": float(np.mean(iou[present])) if present.any() else 0.0,
          "per_class": iou, "pixel_acc": float(tp.sum() / max(cm.sum(), 1.0)),
          "protocol": protocol}
