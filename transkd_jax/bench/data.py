"""``benchmark data``: the training input pipeline.

Decode + augment + batch throughput of the configured training pipeline. With
the generated dataset (the default) the tree is written at Cityscapes size,
2048x1024 PNGs, resized by the pipeline to ``config.image_size``, so the
number stands for Cityscapes. Prints one JSON line: imgs_per_s, workers,
per_worker, source size, image_size.
"""

import os
import tempfile
import time

from transkd_jax import data


def bench_data(config, workers: int, batches: int = 20) -> dict:
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.num_workers = workers
    if config.data.name == "generated":
      config.data.generated_size = (1024, 2048)
      config.data.num_train = max(int(config.batch_size) * 4, 16)
      config.data.num_val = 1
      if not config.data.root:
        config.data.root = os.path.join(tempfile.gettempdir(), "transkd_bench_cityscapes_size")
  it = data.make_train_iterator(config)
  next(it)  # start workers, warm caches
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  elapsed = time.perf_counter() - start
  rate = batches * int(config.batch_size) / elapsed
  return {"bench": "data", "dataset": config.data.name, "workers": workers,
          "imgs_per_s": round(rate, 2), "per_worker": round(rate / max(workers, 1), 2),
          "image_size": list(config.image_size), "batch_size": int(config.batch_size)}

