"""``benchmark data``: the training input pipeline.

Decode + augment + batch throughput of the configured training pipeline. With
the generated dataset (the default) the tree is written at Cityscapes size,
2048x1024 PNGs, resized by the pipeline to ``config.image_size``, so the
number stands for Cityscapes. The consumer first stalls for ``stall_s`` (the
readers fill their buffers, as behind a slow step), then reads as fast as it
can. Prints one JSON line per worker count: imgs_per_s, workers, per_worker,
peak_host_mb (the most resident memory of this process and its workers
together, sampled every 50 ms: what the pipeline costs the host, bounded by
``config.data.prefetch``), image_size.
"""

import os
import tempfile
import threading
import time

from transkd_jax import data
from transkd_jax.data.pipeline import num_workers


def _rss_kb(pid: int) -> int:
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1])
  except OSError:
    pass
  return 0


def _children(pid: int):
  try:
    tasks = os.listdir(f"/proc/{pid}/task")
  except OSError:
    return []
  out = []
  for task in tasks:
    try:
      with open(f"/proc/{pid}/task/{task}/children") as f:
        out += [int(c) for c in f.read().split()]
    except OSError:
      continue
  return out


def tree_rss_mb(pid: int = 0) -> float:
  """Resident memory of ``pid`` (this process) and all its descendants, in MB (Linux)."""
  pending, total, seen = [pid or os.getpid()], 0, set()
  while pending:
    p = pending.pop()
    if p in seen:
      continue
    seen.add(p)
    total += _rss_kb(p)
    pending += _children(p)
  return total / 1024


class PeakMemory:
  """Samples ``tree_rss_mb`` in a thread while in the ``with`` block; ``.peak_mb``."""

  def __init__(self, every_s: float = 0.05):
    self.every_s, self.peak_mb = every_s, 0.0
    self._stop = threading.Event()

  def _run(self):
    while not self._stop.is_set():
      self.peak_mb = max(self.peak_mb, tree_rss_mb())
      self._stop.wait(self.every_s)

  def __enter__(self):
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak_mb = max(self.peak_mb, tree_rss_mb())


def bench_data(config, workers, batches: int = 20, stall_s: float = 3.0) -> dict:
  config.data.num_workers = workers  # before copying: the copy fixes the field's type
  config = config.copy_and_resolve_references()
  with config.unlocked():
    if config.data.name == "generated":
      config.data.generated_size = (1024, 2048)
      config.data.num_train = max(int(config.batch_size) * 4, 16)
      config.data.num_val = 1
      if not config.data.root:
        config.data.root = os.path.join(tempfile.gettempdir(), "transkd_bench_cityscapes_size")
  with PeakMemory() as memory:
    it = data.make_train_iterator(config)
    next(it)  # start workers, warm caches
    time.sleep(stall_s)  # a slow consumer: the buffers fill, and must stay bounded
    start = time.perf_counter()
    for _ in range(batches):
      next(it)
    elapsed = time.perf_counter() - start
    del it
  rate = batches * int(config.batch_size) / elapsed
  count = num_workers(config)
  return {
    "bench": "data",
    "dataset": config.data.name,
    "workers": count,
    "imgs_per_s": round(rate, 2),
    "per_worker": round(rate / max(count, 1), 2),
    "peak_host_mb": round(memory.peak_mb, 1),
    "prefetch": int(config.data.prefetch),
    "image_size": list(config.image_size),
    "batch_size": int(config.batch_size),
  }
