"""Input pipelines: sources in the official layouts, transforms, grain loaders.

    from transkd_jax import data
    data.check_config(config.data)              # at start-up; UserError names the key
    it = data.make_train_iterator(config)       # endless; it.get_state() / set_state()
    for batch in data.make_eval_iterator(config, "val"): ...

Modules, lowest first: ``labels`` (IGNORE, class tables, label mappings), ``readers``
(image/label files, ``PairedSource``), ``generated`` (the scene generator), ``sources``
(the file-layout datasets), ``tfds_source`` (prepared TFDS datasets) and ``folder`` (your
own images and masks with a class file), ``transforms``,
``datasets`` (the table: one row per dataset; ``make_source``, ``check_config``),
``classes`` (class names and palettes per dataset), ``pipeline`` (grain iterators);
``browse`` (``python -m transkd_jax.data.browse``: one example's PNGs as the model sees it).

``config.data`` keys (``default_data_config()`` lists them with defaults):
``name`` (a row of ``DATASETS``, ``datasets.py``), ``root``, ``conditions`` (ACDC),
``transforms`` (reference | aligned | mmseg: of train and eval alike),
``eval_label_resolution`` (quarter | full; reference protocol; empty follows
``config.eval_protocol``), ``num_workers``, ``prefetch``, the ``tfds_*`` keys of ``tfds``,
``skip_bad_files``, for ``mmseg``: ``mmseg_scale``, ``mmseg_ratio_range``,
``mmseg_cat_max_ratio``, and for ``generated``: ``num_train``, ``num_val``,
``generated_size``, ``generated_seed``, and for ``folder``: ``folder_images``,
``folder_masks``, ``folder_classes``, ``folder_splits``, ``folder_val_fraction``,
``folder_split_seed``.

Transforms (``transforms.py`` has the details): ``reference``, the public TransKD
code's, exactly (resize to ``config.image_size``, labels to 1/4 by PIL's
NEAREST, flip, a -2..2 px shift that moves the label 4x as far as the image,
[0, 1] images); ``aligned``, the same with image and label shifted together;
``mmseg``, SegFormer's Cityscapes config in
mmsegmentation (random rescale, ``config.image_size`` crop with
cat_max_ratio, flip, photometric distortion, ImageNet mean/std, full-resolution
labels; eval: rescaled to fit ``mmseg_scale``, labels at the dataset's size).
"""

import ml_collections

from transkd_jax.data.classes import CLASS_NAMES, PALETTES
from transkd_jax.data.datasets import DATASETS, Dataset, check_config, make_source
from transkd_jax.data.pipeline import DevicePrefetch, make_eval_iterator, make_train_iterator
from transkd_jax.data.transforms import TRANSFORMS


def default_data_config(**overrides) -> ml_collections.ConfigDict:
  """Every ``config.data`` key with its default (the generated dataset)."""
  config = ml_collections.ConfigDict(
    {
      "name": "generated",  # a row of DATASETS (datasets.py)
      "root": "",  # dataset root; for generated: where it is written
      "conditions": "all",  # ACDC: "all" or a comma list of fog, night, rain, snow
      "transforms": "reference",  # train + eval transforms: "reference" (the public code's,
      # bug-compatible), "aligned" (its shift without the
      # misregistration) or "mmseg" (SegFormer's mmseg config)
      "eval_label_resolution": "",  # reference protocol: "quarter" | "full" (dataset's own
      # size); empty: full for eval_protocol standard, else quarter
      "eval_label_pad": (0, 0),  # standard protocol: pad full-size labels to (h, w) when
      # a split's sizes differ (VOC); (0, 0): the first label's
      "mmseg_scale": (1024, 2048),  # mmseg: (height, width) base scale; aspect ratio kept
      "mmseg_ratio_range": (0.5, 2.0),  # mmseg train: scale times a uniform ratio in this range
      "mmseg_cat_max_ratio": 0.75,  # mmseg train: redraw crops where one class covers >= this
      # grain worker processes: 0 (in-process threads), N, or "auto" (0 on CPU devices,
      # else the CPUs less one, at most 16); an int or a string, so typed as object
      "num_workers": ml_collections.FieldReference("auto", field_type=object),
      "prefetch": 2,  # batches buffered (and threads reading) per process
      "skip_bad_files": False,  # undecodable files: error (False) or skip with a warning
      "tfds_name": "",  # tfds: name[/config][:version] (data/tfds_source.py)
      "tfds_image_key": "image",
      "tfds_label_key": "segmentation_mask",
      "tfds_name_key": "",  # tfds: a feature naming each example ("": split_index)
      "tfds_label_mapping": "train_ids",  # tfds: train_ids | cityscapes_ids | nyu40
      "tfds_num_classes": 0,  # tfds: 0 is the mapping's own (19; 40 for nyu40)
      "num_train": 200,  # generated dataset: images per split
      "num_val": 50,
      "generated_size": (256, 512),  # (height, width) of generated images
      "generated_seed": 0,
      # folder (data/folder.py): paths under root unless absolute or URIs
      "folder_images": "images",  # folder: <stem>.png / .jpg / .jpeg, any depth
      "folder_masks": "masks",  # folder: <stem>.png, single channel, paired by stem
      "folder_classes": "classes.json",  # folder: names, palette, ignore, map (JSON or YAML)
      "folder_splits": "",  # folder: a directory of <split>.txt stem lists; empty: train
      # and val drawn from the sorted stems by folder_val_fraction and folder_split_seed
      "folder_val_fraction": 0.2,  # folder without list files: the share of stems in val
      "folder_split_seed": 0,  # folder without list files: seeds the draw (every host alike)
    }
  )
  config.update(overrides)
  return config


__all__ = [
  "CLASS_NAMES",
  "DATASETS",
  "Dataset",
  "PALETTES",
  "TRANSFORMS",
  "check_config",
  "default_data_config",
  "make_eval_iterator",
  "make_source",
  "make_train_iterator",
  "DevicePrefetch",
]
