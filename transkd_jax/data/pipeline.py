"""grain pipelines: per-process shards, per-epoch shuffles, batches, iterator state.

Training: the source is split across processes (process i reads examples
i, i + P, ...), shuffled with ``config.seed`` and reshuffled every epoch,
augmented with a per-example random stream (deterministic by position), and
batched to the process's share of ``config.batch_size``. Batches also carry
``skipped`` per example: bad files passed over (``config.data.skip_bad_files``).
The iterator is a ``grain.DatasetIterator``: ``get_state``/``set_state`` (and Orbax through
``grain.checkpoint``) resume it exactly. ``config.data.num_workers`` > 0 runs
the transforms in worker processes (they need absl flags parsed: run under
``absl.app``, or call ``absl.flags.FLAGS.mark_as_parsed()`` first).

Evaluation: one ordered pass over the split, padded to whole batches on every
process (the same number of batches everywhere) with a boolean ``valid`` per
example, so sharded evaluation never drops or double-counts an image.
"""

import math

import grain
import jax
import numpy as np

from transkd_jax.data import transforms
from transkd_jax.data.sources import make_source
from transkd_jax.errors import UserError


def _process(process_index, process_count):
  return (jax.process_index() if process_index is None else process_index,
          jax.process_count() if process_count is None else process_count)


def _local_batch(config, process_count):
  if config.batch_size % process_count:
    raise UserError(f"config.batch_size={config.batch_size} does not divide over "
                    f"{process_count} processes")
  return config.batch_size // process_count


def _train_transform(config):
  """fn(example, rng) of ``config.data.protocol`` (reference | mmseg)."""
  return transforms.train_transform(config)


def _with_workers(ds: grain.IterDataset, config):
  workers = int(config.data.get("num_workers", 0))
  if workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return ds


def make_train_iterator(config, process_index=None, process_count=None):
  """An endless iterator of host-local batches {"image", "label"} with get/set_state."""
  index, count = _process(process_index, process_count)
  local = _local_batch(config, count)
  source = make_source(config.data, config.get("train_split", "train"))
  ds = grain.MapDataset.source(source)[index::count]
  if len(ds) < local:
    raise UserError(f"process {index} holds {len(ds)} training examples, fewer than its "
                    f"batch of {local}")
  ds = ds.shuffle(seed=config.seed).repeat(None)
  ds = ds.random_map(_strip(_train_transform(config)), seed=config.seed)
  ds = ds.batch(local, drop_remainder=True)
  return iter(_with_workers(ds.to_iter_dataset(), config))


def _strip(fn):
  """Applies ``fn`` to image + label; keeps the example's count of skipped bad files."""
  def apply(example, rng):
    out = fn({"image": example["image"], "label": example["label"]}, rng)
    out["skipped"] = np.int32(example.get("skipped", 0))
    return out
  return apply


def make_eval_iterator(config, split: str = "val", process_index=None, process_count=None):
  """One pass over ``split``: batches {"image", "label", "valid"}, padded to whole batches."""
  index, count = _process(process_index, process_count)
  local = _local_batch(config, count)
  source = make_source(config.data, split)
  shard = grain.MapDataset.source(source)[index::count]
  per_process = math.ceil(len(source) / count)
  padded = max(math.ceil(per_process / local), 1) * local
  transform = transforms.eval_transform(config)  # the protocol the model trained under

  def load(i):
    example = shard[min(i, len(shard) - 1)] if len(shard) else source[0]
    out = transform(example)
    out["valid"] = np.bool_(i < len(shard))
    out["skipped"] = np.int32(example.get("skipped", 0) if i < len(shard) else 0)
    return out

  ds = grain.MapDataset.range(padded).map(load).batch(local, drop_remainder=True)
  return iter(_with_workers(ds.to_iter_dataset(), config))
