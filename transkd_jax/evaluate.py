"""Segmentation metrics: a confusion matrix accumulated on device, then mIoU.

``standard`` protocol: logits resized bilinearly to the labels' resolution,
classes absent from both prediction and label left out of the mean.
(The evaluation issue adds the ``reference`` protocol and the reports.)
"""

from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

from transkd_jax.distill.losses import IGNORE_LABEL
from transkd_jax.models.resize import resize_bilinear


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


def miou_from_confusion(cm: np.ndarray) -> Dict[str, object]:
  """{"miou", "per_class" (NaN for absent classes), "pixel_acc"} of a confusion matrix."""
  cm = np.asarray(cm, np.float64)
  tp = np.diag(cm)
  union = cm.sum(0) + cm.sum(1) - tp
  with np.errstate(invalid="ignore", divide="ignore"):
    iou = np.where(union > 0, tp / union, np.nan)
  present = union > 0
  return {"miou": float(np.mean(iou[present])) if present.any() else 0.0,
          "per_class": iou, "pixel_acc": float(tp.sum() / max(cm.sum(), 1.0))}
