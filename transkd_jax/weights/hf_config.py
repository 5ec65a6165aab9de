"""HuggingFace transformers' config files for an exported SegFormer: ``config.json``
(SegformerConfig), ``preprocessor_config.json`` (SegformerImageProcessor), and what the
checkpoint says about its inputs (normalisation, image size, class names)."""

import ml_collections

from transkd_jax import checkpoint as ckpt_lib
from transkd_jax import storage
from transkd_jax.data import classes
from transkd_jax.models.mit import EPS_BLOCK
from transkd_jax.models.variants import PATCH_GEOMETRY, MiTVariant

# SegformerImageProcessor's mean/std on [0, 1] pixels; ImageNet's is the mmseg transforms'
# MEAN / STD (0-255 scale) over 255.
IMAGE_STATS = {
  "unit": ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0]),
  "imagenet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
}
PIL_BILINEAR = 2  # the reference transforms resize with PIL's bilinear filter


def input_settings(checkpoint: str, choice: str, source: str = ""):
  """(normalization, why, image_size or None, data config or None) for ``--normalization``."""
  path = storage.resolve(checkpoint)
  config = ckpt_lib.saved_config(path, source)
  data = (config or {}).get("data") or {}
  transforms = data.get("transforms", data.get("protocol", "reference"))
  image_size = None
  if config is not None and transforms != "mmseg" and len(config.get("image_size") or ()) == 2:
    image_size = tuple(int(v) for v in config["image_size"])
  if choice != "auto":
    return choice, "--normalization", image_size, data or None
  recorded, why = ckpt_lib.recorded_normalization(path, source)
  if recorded is not None:
    return recorded, why, image_size, data or None
  return "unit", "the default (TransKD's [0, 1] inputs)", None, None


def class_names(num_classes: int, data_config=None):
  """The dataset's names; without a dataset, the one table with that many classes; else class_i."""
  if data_config:
    try:
      return tuple(classes.class_names(ml_collections.ConfigDict(dict(data_config)), num_classes))
    except (AttributeError, KeyError):  # a config without the dataset's keys
      pass
  tables = {names for names in classes.CLASS_NAMES.values() if len(names) == num_classes}
  if len(tables) == 1:
    return tables.pop()
  return tuple(f"class_{i}" for i in range(num_classes))


def hf_config(spec: MiTVariant, num_classes: int, names, num_channels: int = 3) -> dict:
  """transformers' SegformerConfig fields for ``spec`` (as config.json holds them)."""
  return {
    "architectures": ["SegformerForSemanticSegmentation"],
    "model_type": "segformer",
    "num_channels": num_channels,
    "num_encoder_blocks": 4,
    "depths": list(spec.depths),
    "hidden_sizes": list(spec.channels),
    "num_attention_heads": list(spec.heads),
    "sr_ratios": list(spec.sr_ratios),
    "mlp_ratios": list(spec.mlp_ratios),
    "patch_sizes": [kernel for kernel, _, _ in PATCH_GEOMETRY],
    "strides": [stride for _, stride, _ in PATCH_GEOMETRY],
    "decoder_hidden_size": spec.decoder_width,
    "hidden_act": "gelu",  # exact (erf) GELU, as the Flax model
    "layer_norm_eps": EPS_BLOCK,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "classifier_dropout_prob": spec.head_dropout,
    "drop_path_rate": spec.drop_path_rate,
    "initializer_range": 0.02,
    "reshape_last_stage": True,
    "semantic_loss_ignore_index": classes.IGNORE,
    "num_labels": num_classes,
    "id2label": {str(i): name for i, name in enumerate(names)},
    "label2id": {name: i for i, name in enumerate(names)},
  }


def preprocessor_config(normalization: str, image_size=None) -> dict:
  """SegformerImageProcessor settings: [0, 1] pixels, then ``normalization``'s mean/std."""
  mean, std = IMAGE_STATS[normalization]
  height, width = image_size or (512, 512)
  return {
    "image_processor_type": "SegformerImageProcessor",
    "do_resize": image_size is not None,
    "size": {"height": int(height), "width": int(width)},
    "resample": PIL_BILINEAR,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": mean,
    "image_std": std,
    "do_reduce_labels": False,
  }
