"""Where training metrics go: a JSON-lines file, TensorBoard, and the console.

Only process 0 writes. ``WORKDIR/metrics.jsonl`` gets one JSON object per
logged step (``{"step": ..., "split": "train"|"val", name: value, ...}``);
``WORKDIR/tensorboard/`` gets the same scalars as event files (tensorboardX,
which needs no TensorFlow), under "train/<name>" and "val/<name>". A gs://
workdir works too (transkd_jax/storage.py; TensorBoard there needs
google-cloud-storage).
"""

import json
import sys
from typing import Dict

import jax

from transkd_jax import storage


def _import_summary_writer():
  """tensorboardX's SummaryWriter, imported with torch hidden unless torch is loaded.

  tensorboardX imports torch when it is installed (two seconds at every start, for
  torch tensors this module never passes); with ``sys.modules["torch"] = None`` its
  ``import torch`` raises ImportError, which tensorboardX handles.
  """
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None
  try:
    from tensorboardX import SummaryWriter
  finally:
    if hide:
      del sys.modules["torch"]
  return SummaryWriter


SummaryWriter = _import_summary_writer()


class MetricWriter:
  def __init__(self, workdir: str, enabled: bool = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._file = None
    if self.enabled:
      storage.makedirs(workdir)
      self._file = storage.LineFile(storage.join(workdir, "metrics.jsonl"))
      self._tb = SummaryWriter(storage.join(workdir, "tensorboard"))

  def write(self, step: int, split: str, scalars: Dict[str, float]):
    if not self.enabled:
      return
    row = {"step": int(step), "split": split, **{k: float(v) for k, v in scalars.items()}}
    self._file.write(json.dumps(row) + "\n")
    for name, value in scalars.items():
      self._tb.add_scalar(f"{split}/{name}", float(value), int(step))
    self._tb.flush()

  def close(self):
    if self.enabled:
      self._file.close()
      self._tb.close()


def read_metrics(workdir: str):
  """The rows of ``WORKDIR/metrics.jsonl`` (e.g. to plot a loss curve in a notebook)."""
  path = storage.join(workdir, "metrics.jsonl")
  if not storage.exists(path):
    return []
  return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]
