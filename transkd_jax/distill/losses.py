"""Distillation and segmentation losses, as pure functions (NHWC, float32).

Every function takes arrays and returns a scalar; none holds parameters. The
formulas are docs/transkd.md#losses; where the public PyTorch code does something
particular (HCL's level weights, CWD's normalisation) the docstring says so.
"""

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from transkd_jax.data.classes import IGNORE


def mse(a, b):
  """Mean squared error over all elements (PyTorch's ``mse_loss``, mean)."""
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  return jnp.mean(jnp.square(a - b))


@functools.lru_cache(maxsize=None)
def adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """out_size x in_size averaging matrix of PyTorch's adaptive average pooling.

  Bin i covers floor(i * n / l) .. ceil((i + 1) * n / l) - 1; bins overlap when
  n is not a multiple of l, so a reshape-mean is not enough in general.
  """
  m = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -(-((i + 1) * in_size) // out_size)  # ceil
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x, size: int):
  """Adaptive average pooling of an NHWC map to size x size (PyTorch's bins)."""
  ph = jnp.asarray(adaptive_pool_matrix(x.shape[1], size))
  pw = jnp.asarray(adaptive_pool_matrix(x.shape[2], size))
  return jnp.einsum(
    "ih,nhwc,jw->nijc", ph, jnp.asarray(x, jnp.float32), pw, precision=jax.lax.Precision.HIGHEST
  )


def hcl_stage(s, t, levels: Sequence[int] = (4, 2, 1)):
  """Hierarchical context loss of one stage: MSE plus pooled MSEs, normalised.

  Levels l >= the map's height are skipped. As in the public code (the code
  produced the published numbers), the weight halves at every level that is
  *used*: 1/2 for the first pooled level, 1/4 for the next, ... So for a map of
  height > 4 the weights are w_4 = 0.5, w_2 = 0.25, w_1 = 0.125 (docs/transkd.md);
  for a map of height 3 or 4 they are w_2 = 0.5, w_1 = 0.25, and for height 2,
  w_1 = 0.5. The sum is divided by 1 + the weights used.
  """
  if s.shape != t.shape:
    raise ValueError(f"HCL needs maps of equal shape, got {s.shape} and {t.shape}")
  loss = mse(s, t)
  weight, total = 1.0, 1.0
  for level in levels:
    if level >= s.shape[1]:
      continue
    weight /= 2.0
    loss = loss + weight * mse(adaptive_avg_pool(s, level), adaptive_avg_pool(t, level))
    total += weight
  return loss / total


def hcl(student_maps: Sequence, teacher_maps: Sequence):
  """Hierarchical context loss summed over stages (pairs of NHWC maps)."""
  return sum(hcl_stage(s, t) for s, t in zip(student_maps, teacher_maps))


def weighted_mse(student: Sequence, teacher: Sequence, weights: Sequence[float]):
  """sum_i w_i * MSE(student_i, teacher_i): PEA's loss, and FitNet's."""
  return sum(w * mse(s, t) for s, t, w in zip(student, teacher, weights))


def cwd(s, t, temperature: float = 1.0):
  """Channel-wise distillation (Shu et al. 2021) between two NHWC maps.

  Per sample and channel, a softmax over spatial positions of map / T;
  KL(teacher || student) summed over everything, divided by batch x channels,
  times T^2 (the public code's CriterionCWD with norm 'channel', 'kl').
  """
  if s.shape != t.shape:
    raise ValueError(f"CWD needs maps of equal shape, got {s.shape} and {t.shape}")
  n, h, w, c = s.shape
  s = jnp.asarray(s, jnp.float32).reshape(n, h * w, c) / temperature
  t = jnp.asarray(t, jnp.float32).reshape(n, h * w, c) / temperature
  log_ps = jax.nn.log_softmax(s, axis=1)
  log_pt = jax.nn.log_softmax(t, axis=1)
  kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps))
  return kl / (n * c) * temperature**2


def logit_kd(student_logits, teacher_logits, temperature: float = 1.0):
  """Hinton's KD per pixel: KL(softmax(t/T) || softmax(s/T)) * T^2, mean over pixels."""
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(
      f"logit KD needs logits of equal shape, got {student_logits.shape} and {teacher_logits.shape}"
    )
  log_ps = jax.nn.log_softmax(jnp.asarray(student_logits, jnp.float32) / temperature, -1)
  log_pt = jax.nn.log_softmax(jnp.asarray(teacher_logits, jnp.float32) / temperature, -1)
  kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)
  return jnp.mean(kl) * temperature**2


def cross_entropy(
  logits, labels, class_weights: Optional[Sequence[float]] = None, ignore_label: int = IGNORE
):
  """Segmentation cross-entropy, PyTorch ``NLLLoss(weight)`` semantics.

  ``logits`` N x h x w x K, ``labels`` N x h x w integer train ids with
  ``ignore_label`` for unlabelled pixels. With class weights the mean is
  sum(w_y * nll) / sum(w_y) over labelled pixels. A batch with no labelled
  pixel gives 0 (not NaN).
  """
  if logits.shape[:3] != labels.shape:
    raise ValueError(
      f"labels of shape {labels.shape} do not match logits {logits.shape}; "
      "resize labels to the logits' resolution (1/4 of the input) first"
    )
  num_classes = logits.shape[-1]
  labels = labels.astype(jnp.int32)
  valid = labels != ignore_label
  safe = jnp.where(valid, labels, 0)
  log_p = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_p, safe[..., None], axis=-1)[..., 0]
  if class_weights is None:
    w = valid.astype(jnp.float32)
  else:
    class_weights = jnp.asarray(class_weights, jnp.float32)
    if class_weights.shape != (num_classes,):
      raise ValueError(
        f"class_weights has {class_weights.shape[0]} entries; the model "
        f"predicts {num_classes} classes"
      )
    w = jnp.where(valid, class_weights[safe], 0.0)
  return jnp.sum(w * nll) / jnp.maximum(jnp.sum(w), 1e-12)
