"""Checkpoint files -> state dicts ({name: numpy array}): safetensors, PyTorch, sharded
HuggingFace ``*.index.json`` files and ``save_pretrained`` directories."""

import json
import os
from typing import Dict

import numpy as np
from safetensors.numpy import load_file

from transkd_jax.errors import UserError

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".tar", ".ckpt")
TORCH_HINT = 'pip install -e ".[torch]"'


def import_torch(needed_for: str, alternative: str):
  """torch, or UserError saying what needs it and what does without."""
  try:
    import torch  # optional and heavy: only PyTorch files need it
  except ImportError:
    raise UserError(f"{needed_for} needs torch ({TORCH_HINT}); {alternative}") from None
  return torch


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
  try:
    return dict(load_file(path))
  except Exception as e:  # safetensors raises its own error types
    raise UserError(f"{path}: not a readable safetensors file ({e})") from None


def read_torch(path: str) -> Dict[str, np.ndarray]:
  """A PyTorch state dict, possibly under ``state_dict`` / ``model`` / ``module``."""
  torch = import_torch(f"{path}: reading PyTorch checkpoints", "safetensors files need no torch")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise UserError(
      f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: "
      f"{str(e).splitlines()[0] if str(e) else ''})"
    ) from None
  for key in ("state_dict", "model", "module"):
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      obj = obj[key]
      break
  if not isinstance(obj, dict) or not any(torch.is_tensor(v) for v in obj.values()):
    raise UserError(
      f"{path}: expected a state dict (names -> tensors), possibly under "
      f"'state_dict' or 'model'; found {type(obj).__name__}"
    )
  return {
    k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
    for k, v in obj.items()
    if torch.is_tensor(v)
  }


def read_index(path: str, reader) -> Dict[str, np.ndarray]:
  """A sharded HuggingFace checkpoint (``*.index.json``), each shard read by ``reader``."""
  with open(path) as f:
    shards = sorted(set(json.load(f)["weight_map"].values()))
  out = {}
  for shard in shards:
    out.update(reader(os.path.join(os.path.dirname(path), shard)))
  return out


def read_safetensors_index(path: str) -> Dict[str, np.ndarray]:
  return read_index(path, read_safetensors)


def read_torch_index(path: str) -> Dict[str, np.ndarray]:
  return read_index(path, read_torch)


# What a save_pretrained directory may hold, in the order they are tried.
HF_FILES = (
  ("model.safetensors", read_safetensors),
  ("model.safetensors.index.json", read_safetensors_index),
  ("pytorch_model.bin", read_torch),
  ("pytorch_model.bin.index.json", read_torch_index),
)


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
  """Tensors of a checkpoint file or HuggingFace directory, as numpy arrays."""
  if not os.path.exists(path):
    raise UserError(f"--input {path}: no such file or directory")
  if os.path.isdir(path):
    for name, reader in HF_FILES:
      if os.path.exists(os.path.join(path, name)):
        return reader(os.path.join(path, name))
    raise UserError(
      f"--input {path}: a directory, but it holds none of model.safetensors, "
      "pytorch_model.bin (or their .index.json): expected a HuggingFace "
      "save_pretrained directory"
    )
  if path.endswith(".safetensors"):
    return read_safetensors(path)
  if path.endswith(".index.json"):
    return read_safetensors_index(path) if "safetensors" in path else read_torch_index(path)
  if path.endswith(TORCH_SUFFIXES):
    return read_torch(path)
  raise UserError(
    f"--input {path}: unknown checkpoint type; expected a .safetensors file, a "
    f"PyTorch file ({', '.join(TORCH_SUFFIXES)}) or a HuggingFace directory"
  )
