"""grain pipelines: per-process shards, per-epoch shuffles, batches, iterator state.

Training: one global stream of examples, shuffled with ``config.seed`` and
reshuffled every epoch, augmented with a per-example random stream
(deterministic by position in the stream), cut into global batches of
``config.batch_size``; process i of P reads and transforms only the i-th of
the P equal parts of each global batch. The global batches are therefore the
same for any number of processes: a run on 2 hosts sees the data a run on 1
host sees, and a checkpoint resumes on another process count. Batches also carry
``skipped`` per example: bad files passed over (``config.data.skip_bad_files``).
The iterator is a ``grain.DatasetIterator``: ``get_state``/``set_state`` (and Orbax through
``transkd_jax.checkpoint``) resume it exactly; its state (the number of global
batches read) is the same on every process. ``config.data.num_workers`` > 0 runs
the transforms in worker processes (they need absl flags parsed: run under
``absl.app``, or call ``absl.flags.FLAGS.mark_as_parsed()`` first); ``"auto"``
picks a number from the CPUs (``num_workers``). Buffers are bounded
(``config.data.prefetch`` batches per process, ``read_options``), so host memory
does not grow when the consumer is slower than the readers. Images are uint8.

Evaluation: one ordered pass over the split, padded to whole batches on every
process (the same number of batches everywhere) with a boolean ``valid`` per
example, so sharded evaluation never drops or double-counts an image.
"""

import collections
import math
import os
import signal
import threading
import time

import grain
import jax
import numpy as np

from transkd_jax.data import transforms
from transkd_jax.data.datasets import make_source
from transkd_jax.data.labels import IGNORE
from transkd_jax.errors import UserError


def _process(process_index, process_count):
  return (
    jax.process_index() if process_index is None else process_index,
    jax.process_count() if process_count is None else process_count,
  )


def _local_batch(config, process_count):
  if config.batch_size % process_count:
    raise UserError(
      f"config.batch_size={config.batch_size} does not divide over {process_count} processes"
    )
  return config.batch_size // process_count


def _train_transform(config):
  """fn(example, rng) of ``config.data.transforms`` (reference | mmseg)."""
  return transforms.train_transform(config)


def num_workers(config, devices=None) -> int:
  """``config.data.num_workers``; ``"auto"``: none when the devices are CPUs (the step
  uses every core; reading runs in threads beside it), else one per CPU this process
  may use (its affinity: a SLURM task's share) less one for the training loop, at most 16."""
  workers = config.data.num_workers
  if workers != "auto":
    return int(workers)
  devices = jax.local_devices() if devices is None else devices
  if all(d.platform == "cpu" for d in devices):
    return 0
  try:
    cpus = len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    cpus = os.cpu_count() or 1
  return max(0, min(cpus - 1, 16))


def read_options(config) -> grain.ReadOptions:
  """Bounded reading: ``config.data.prefetch`` batches buffered per process (grain's
  default is 500 elements, a batch each here: gigabytes at 512 x 1024), read by as many threads."""
  depth = int(config.data.prefetch)
  return grain.ReadOptions(num_threads=depth, prefetch_buffer_size=depth)


def _ignore_sigterm(worker_index: int, worker_count: int):
  """In each data worker: SIGTERM is the training process's to act on. SLURM
  (``scancel --signal``, preemption) and ``kill -- -PGID`` signal every process, and a
  worker that died of it would fail the very read the run needs to save and stop.
  A worker whose training process is gone (exited at once, killed) exits too."""
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  parent = os.getppid()

  def exit_with_parent():
    while os.getppid() == parent:
      time.sleep(1.0)
    os._exit(0)

  threading.Thread(target=exit_with_parent, name="exit-with-parent", daemon=True).start()


def _loader(ds: grain.MapDataset, config) -> grain.IterDataset:
  """Read with bounded buffers; in ``num_workers`` processes when > 0 (each holds
  ``prefetch`` batches of its own and hands over one at a time)."""
  ds = ds.to_iter_dataset(read_options(config))
  workers = num_workers(config)
  if workers > 0:
    ds = ds.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=1),
      worker_init_fn=_ignore_sigterm,
    )
  return ds


def make_train_iterator(config, process_index=None, process_count=None):
  """An endless iterator of host-local batches {"image", "label"} with get/set_state."""
  index, count = _process(process_index, process_count)
  local = _local_batch(config, count)
  source = make_source(config.data, config.train_split, config.num_classes)
  ds = grain.MapDataset.source(source)
  if len(ds) < config.batch_size:
    raise UserError(
      f"the {config.train_split} split holds {len(ds)} examples, "
      f"fewer than config.batch_size={config.batch_size}"
    )
  ds = ds.shuffle(seed=config.seed).repeat(None)
  ds = ds.random_map(_strip(_train_transform(config)), seed=config.seed)
  # Blocks of `local` consecutive examples; block b belongs to process b % count,
  # so this process's n-th batch is its part of global batch n.
  ds = ds.batch(local, drop_remainder=True)[index::count]
  return iter(_loader(ds, config))


class DevicePrefetch:
  """``put(batch)`` of ``iterator``'s batches, ``depth`` batches ahead.

  ``put`` starts the batch's copy to the devices (``sharding.global_batch``), and the
  copy is asynchronous, so with depth 2 the next batch is on its way to the devices
  while a step runs. ``get_state`` is the wrapped iterator's state after the last
  batch handed out, not after the last one read ahead: a checkpoint resumes with
  the first batch not yet trained on. ``set_state`` drops what was read ahead.
  """

  def __init__(self, iterator, put, depth: int = 2):
    self._iterator, self._put, self._depth = iterator, put, max(1, int(depth))
    self._ahead = collections.deque()  # (put batch, the iterator's state after it)
    self._state = iterator.get_state()

  def __iter__(self):
    return self

  def __next__(self):
    while len(self._ahead) < self._depth:
      batch = next(self._iterator)
      self._ahead.append((self._put(batch), self._iterator.get_state()))
    batch, self._state = self._ahead.popleft()
    return batch

  def get_state(self):
    return self._state

  def set_state(self, state):
    self._iterator.set_state(state)
    self._ahead.clear()
    self._state = self._iterator.get_state()


def _strip(fn):
  """Applies ``fn`` to image + label; keeps the example's count of skipped bad files."""

  def apply(example, rng):
    out = fn({"image": example["image"], "label": example["label"]}, rng)
    out["skipped"] = np.int32(example.get("skipped", 0))
    return out

  return apply


def make_eval_iterator(
  config, split: str = "val", process_index=None, process_count=None, limit: int = 0
):
  """One pass over ``split`` (its first ``limit`` examples when > 0): batches {"image",
  "label", "valid"}, padded to whole batches.

  Full-resolution labels (the ``standard`` protocol) of differing sizes, as
  VOC's, are padded with 255 to one size (``config.data.eval_label_pad``, or
  the split's first label's size) and come with ``label_size`` (true h, w),
  which the evaluation step resizes each example's logits to.
  """
  index, count = _process(process_index, process_count)
  local = _local_batch(config, count)
  source = grain.MapDataset.source(make_source(config.data, split, config.num_classes))
  if limit:
    source = source[:limit]
  shard = source[index::count]
  per_process = math.ceil(len(source) / count)
  padded = max(math.ceil(per_process / local), 1) * local
  transform = transforms.eval_transform(config)  # the protocol the model trained under
  pad = _label_pad(config, source, transform)
  image_shape = transform(source[0])["image"].shape if pad is not None else None

  def load(i):
    example = shard[min(i, len(shard) - 1)] if len(shard) else source[0]
    out = transform(example)
    if local > 1 and image_shape is not None and out["image"].shape != image_shape:
      raise UserError(
        f"evaluation images differ in size after the {config.data.transforms} "
        f"transform ({example.get('name', i)}: {out['image'].shape[:2]}, first: "
        f"{image_shape[:2]}); batches need one size: evaluate with "
        "--config.batch_size=1 (one compile per size) or the reference protocol"
      )
    if pad is not None:
      out = _pad_label(out, pad, example.get("name", i))
    out["valid"] = np.bool_(i < len(shard))
    out["skipped"] = np.int32(example.get("skipped", 0) if i < len(shard) else 0)
    return out

  ds = grain.MapDataset.range(padded).map(load).batch(local, drop_remainder=True)
  return iter(_loader(ds, config))


def _label_pad(config, source, transform):
  """(h, w) full-resolution labels are padded to, or None (labels at a fixed size)."""
  if config.eval_protocol != "standard" or (
    transforms.transforms_of(config) != "mmseg"
    and transforms.eval_label_resolution(config) == "quarter"
  ):
    return None
  chosen = tuple(config.data.eval_label_pad)
  if chosen and any(chosen):
    return chosen
  return transform(source[0])["label"].shape


def _pad_label(out, pad, name):
  h, w = out["label"].shape
  if h > pad[0] or w > pad[1]:
    raise UserError(
      f"the label of {name} is {h}x{w} (height x width), larger than the "
      f"{pad[0]}x{pad[1]} evaluation labels are padded to: set "
      "--config.data.eval_label_pad='(H, W)' to the largest label size of the split"
    )
  out["label"] = transforms.pad_to(out["label"], pad, IGNORE)
  out["label_size"] = np.array([h, w], np.int32)
  return out
