"""A state dict (any layout ``names`` reads) -> the Flax variables of a model: names
brought to the public code's, mapped onto the tree (``layouts``), the public code's 20-way
head cut to 19 classes on request, a bare encoder completed with a fresh decoder."""

from typing import Dict

import numpy as np
from flax import traverse_util

from transkd_jax.errors import UserError
from transkd_jax.models import archs
from transkd_jax.weights.arch import model_label, resolve_arch
from transkd_jax.weights.decoder import fresh_decoder
from transkd_jax.weights.infer import guess_arch
from transkd_jax.weights.layouts import to_flax_layout, torch_name
from transkd_jax.weights.model import expected_shapes
from transkd_jax.weights.names import canonical_names

IGNORE_LABEL_ROW = 19  # the public code's 20th class: the ignore label, loss weight 0


def _summarise_ignored(ignored, log):
  by_reason = {}
  for name, why in ignored:
    by_reason.setdefault(why, []).append(name)
  for why, names in sorted(by_reason.items()):
    shown = ", ".join(sorted(names)[:4]) + (", ..." if len(names) > 4 else "")
    log(f"dropped {len(names)} tensor{'s' if len(names) != 1 else ''} ({why}): {shown}")


def _classes(names, family: str, num_classes, source: str, log):
  """The classes to convert to; cuts a 20-way head's ignore row when 19 are asked for."""
  classifier = archs.ARCHS[family].public.classifier
  weight, bias = classifier + "weight", classifier + "bias"
  source_classes = names[weight].shape[0] if weight in names else None
  if num_classes is None:
    return source_classes or 19
  if source_classes is None or source_classes == num_classes:
    return num_classes
  if (source_classes, num_classes) != (IGNORE_LABEL_ROW + 1, IGNORE_LABEL_ROW):
    raise UserError(
      f"{source + ': ' if source else ''}the checkpoint's head predicts {source_classes} "
      f"classes but --num-classes is {num_classes}; only 20 -> 19 (dropping the ignore "
      "class) is converted. Leave out --num-classes to keep the checkpoint's classes."
    )
  log(
    f"20-way head -> 19 classes: dropped row 19 of {classifier}* (the public code's ignore class)"
  )
  names[weight] = names[weight][:IGNORE_LABEL_ROW]
  if bias in names:
    names[bias] = names[bias][:IGNORE_LABEL_ROW]
  return num_classes


def to_flax_variables(
  state: Dict[str, np.ndarray],
  arch,
  num_classes=None,
  seed: int = 0,
  log=print,
  family=None,
  source: str = "",
):
  """Maps a state dict onto the model of ``arch``; returns ({"params", "batch_stats"},
  num_classes).

  ``arch``: see ``resolve_arch`` (``family`` only for a MiTVariant row meant as
  PVTv2). ``source``: the file, for messages. Raises UserError listing every
  missing, unexpected and mis-shaped tensor.
  """
  family, spec, _, arch_name = resolve_arch(arch, family)
  names, ignored, notes = canonical_names(state, family)
  for note in notes:
    log(note)
  if ignored:
    _summarise_ignored(ignored, log)

  has_decoder = any(n.startswith(archs.ARCHS[family].public.decoder) for n in names)
  num_classes = _classes(names, family, num_classes, source, log)
  expected = expected_shapes(spec, num_classes, family)
  flat, missing, mismatched = {}, [], []
  used = set()
  for path, shape in expected.items():
    if path[1] != "encoder" and not has_decoder:
      continue  # freshly initialised below
    name = torch_name(path, family)
    if name not in names:
      missing.append(name)
      continue
    used.add(name)
    value = to_flax_layout(np.asarray(names[name], np.float32), len(shape))
    if value.shape != shape:
      mismatched.append(
        f"{name}: checkpoint {tuple(names[name].shape)} -> {value.shape}, {arch_name} needs {shape}"
      )
      continue
    flat[path] = value
  unexpected = sorted(set(names) - used)
  if missing or unexpected or mismatched:
    lines = [
      f"{source + ': ' if source else ''}the checkpoint does not fit "
      f"{model_label(family, arch_name)} (--arch={arch_name}) with {num_classes} classes; "
      "nothing was written."
    ]
    guess = guess_arch(state)
    if guess:
      guessed_family, guessed_spec = resolve_arch(guess)[:2]
      if (guessed_family, guessed_spec) != (family, spec):
        lines.append(f"It looks like {guess}: try --arch={guess}.")
    for title, items in (
      ("missing", missing),
      ("unexpected", unexpected),
      ("shape mismatch", mismatched),
    ):
      if items:
        lines.append(f"{title} ({len(items)}):")
        lines += [f"  {item}" for item in items]
    raise UserError("\n".join(lines))
  if not has_decoder:
    parts = "the neck and the head" if family == "pvtv2" else "the head"
    log(
      f"no decoder in the checkpoint (a bare encoder): {parts} ({num_classes} classes) "
      f"freshly initialised with seed {seed}"
    )
    decoder = traverse_util.flatten_dict(fresh_decoder(spec, num_classes, seed, family))
    flat.update({path: decoder[path] for path in expected if path[1] != "encoder"})
  tree = traverse_util.unflatten_dict(flat)
  tree.setdefault("batch_stats", {})
  return tree, num_classes
