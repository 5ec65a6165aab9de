"""Exported files: a HuggingFace ``save_pretrained`` directory (model.safetensors and its
configs), a public-layout PyTorch state dict (model.pth) and an ONNX model (model.onnx), in a
local directory or
under a URI. Each file is written through ``storage.staged``: locally beside and then
moved into place, for a URI locally and then copied there."""

import json

import numpy as np
from safetensors.numpy import save_file

from transkd_jax import storage
from transkd_jax.errors import UserError
from transkd_jax.weights.hf_config import hf_config, preprocessor_config
from transkd_jax.weights.names import public_to_hf
from transkd_jax.weights.readers import import_torch


def write_json(path: str, obj):
  with storage.staged(path) as local:
    with open(local, "w") as f:
      json.dump(obj, f, indent=2)
      f.write("\n")


def write_hf(public, spec, num_classes, output, normalization, image_size, names):
  """``output``/model.safetensors, config.json and preprocessor_config.json of a SegFormer
  given as its public state dict."""
  tensors = {k: np.array(v, order="C") for k, v in public_to_hf(public).items()}
  with storage.staged(storage.join(output, "model.safetensors")) as local:
    save_file(tensors, local, metadata={"format": "pt"})
  in_channels = public["patch_embed1.proj.weight"].shape[1]
  write_json(storage.join(output, "config.json"), hf_config(spec, num_classes, names, in_channels))
  write_json(
    storage.join(output, "preprocessor_config.json"),
    preprocessor_config(normalization, image_size),
  )


def torch_for_export():
  """torch, or UserError saying --format=pytorch needs it (checked before anything is written)."""
  return import_torch("--format=pytorch", "--format=hf needs none")


def write_pytorch(public, output):
  """``output``/model.pth: the public state dict as PyTorch tensors."""
  torch = torch_for_export()
  with storage.staged(storage.join(output, "model.pth")) as local:
    torch.save({k: torch.from_numpy(v) for k, v in public.items()}, local)


def onnx_for_export():
  """onnx, or UserError saying --format=onnx needs it (checked before anything is written)."""
  try:
    import onnx
  except ImportError as e:
    raise UserError(
      "--format=onnx needs the onnx package: pip install -e \".[onnx]\" (onnx, and "
      "onnxruntime to run the model)"
    ) from e
  return onnx


def write_onnx(variables, family, name, spec, num_classes, normalization, argmax, names, path):
  """``path`` (model.onnx): the model's graph with its weights, and what it expects and
  gives in its metadata (family, variant, classes, normalisation)."""
  onnx = onnx_for_export()
  from transkd_jax.weights.onnx_models import onnx_model  # imports onnx

  if argmax and num_classes > 256:
    raise UserError(f"--argmax: uint8 labels hold up to 256 classes; the model has {num_classes}")
  metadata = {
    "family": family,
    "variant": name or "custom",
    "class_names": json.dumps(list(names)),
    "input": "pixels: uint8 RGB, N x 3 x H x W, H and W multiples of 32",
  }
  model = onnx_model(variables, family, spec, num_classes, normalization, argmax, metadata)
  with storage.staged(path) as local:
    onnx.save_model(model, local)
