"""Import the weights people already have into an Orbax checkpoint of our models.

    python -m transkd_jax.convert --input=PATH --arch=ARCH --output=DIR [--num-classes=19]

``--arch``: ``mit_b0`` .. ``mit_b5`` (SegFormer), ``pvt_v2_b0`` .. ``pvt_v2_b5``
(PVTv2 + FPN neck + semantic-FPN head) or ``lvt`` (LVT + SegFormer head).

Reads PyTorch state dicts (``.pth``, ``.pth.tar``, ``.pt``, ``.bin``; needs
torch; optionally under ``state_dict`` / ``model``, with DataParallel's
``module.`` and the distillation wrapper's ``student.`` prefixes, whose other
modules (CSF, PEA, ...) are dropped and listed) and HuggingFace directories
written by ``save_pretrained`` (``model.safetensors`` or ``pytorch_model.bin``;
safetensors needs no torch):

  SegFormer  the official ImageNet encoders (mit_b0.pth ...), SegFormer / mmseg
             checkpoints (``backbone.`` / ``decode_head.``), the public TransKD
             code's SegFormers, HuggingFace ``SegformerForSemanticSegmentation``
             / ``SegformerModel``;
  PVTv2      the official ImageNet encoders (pvt_v2_b0.pth ...: flat
             ``patch_embed1.`` / ``block1.0.`` / ``norm1.`` names; the ImageNet
             classifier ``head.`` is dropped), HuggingFace ``PvtV2Model`` /
             ``PvtV2ForImageClassification``, the public code's PVTv2 teachers
             and students (``backbone.``, ``neck.``, ``head.``);
  LVT        the ImageNet encoder (lvt_imagenet_pretrained.pth.tar:
             ``backbone.{stage}.0.`` / ``backbone.{stage}.1.{block}.``; a
             classifier's ``norm.`` / ``head.`` are dropped) and the public
             code's LVT students (the same plus the SegFormer head's
             ``linear_c*`` / ``linear_fuse`` / ``linear_pred``).

A bare encoder gets a freshly initialised decoder (SegFormer / LVT: the head;
PVTv2: the neck and the head) from ``--seed``. A 20-way head (the public code's
20th class is the ignore label) becomes 19 classes with ``--num-classes=19``.

Writes ``DIR`` (a local directory or a URI, ``gs://...``) with
``orbax.checkpoint.StandardCheckpointer``: the plain pytree
``{"params": ..., "batch_stats": ...}`` of the model (PVTv2 has no BatchNorm:
its batch_stats are empty), plus ``DIR/transkd_convert.json`` saying what it
holds (arch, family and variant as ``transkd_jax.models.archs`` names them,
classes, source, its layout and the input normalisation that layout's code
uses). Names are first brought to the public PyTorch code's names
(``block1.0.attn.kv.weight``, ``backbone.block1.0...``, ``backbone.0.1.0...``),
then mapped onto the Flax tree, whose names follow the same code (the tables
are in transkd_jax/models/pvtv2.py and lvt.py). ``transkd_jax.export`` goes the
other way with the same name tables. The work is done in ``transkd_jax.weights``;
this module is its command line.
"""

import argparse
import os
import sys

from transkd_jax import storage
from transkd_jax.normalization import NORMALIZATIONS
from transkd_jax.weights import cli
from transkd_jax.weights.arch import resolve_arch
from transkd_jax.weights.names import source_format
from transkd_jax.weights.readers import read_state_dict
from transkd_jax.weights.record import META_FILE, record, save
from transkd_jax.weights.to_flax import to_flax_variables

PARSER = cli.command_line(
  "transkd_jax.convert",
  "Convert SegFormer, PVTv2 or LVT weights (PyTorch state dicts, HuggingFace\n"
  "directories) to an Orbax checkpoint of transkd_jax.models, with a\n"
  f"{META_FILE} record (arch, family, variant, classes, source, layout,\n"
  "input normalisation).",
  [
    (
      "--input",
      dict(required=True, help=".pth/.pth.tar/.bin/.safetensors file or HuggingFace directory"),
    ),
    (
      "--arch",
      dict(
        required=True,
        help="mit_b0 .. mit_b5 (SegFormer), pvt_v2_b0 .. pvt_v2_b5 (PVTv2 + FPN), lvt",
      ),
    ),
    ("--output", dict(required=True, help="Orbax checkpoint directory to write")),
    (
      "--num-classes",
      dict(
        type=int,
        default=None,
        help="classes of the head (default: the checkpoint's, 19 for bare "
        "encoders); 19 turns a 20-way head into 19 classes",
      ),
    ),
    (
      "--seed",
      dict(type=int, default=0, help="seed of a freshly initialised decoder (bare encoders)"),
    ),
    (
      "--input-norm",
      dict(
        choices=("auto",) + NORMALIZATIONS,
        default="auto",
        help="the input normalisation the weights expect, recorded with them: "
        "imagenet (mean/std on 0-255 pixels: official ImageNet encoders, "
        "HuggingFace, mmseg) or unit ([0, 1] pixels: the public TransKD "
        "code's teachers and students); auto guesses from the "
        "checkpoint's layout",
      ),
    ),
    ("--overwrite", dict(action="store_true", help="replace an existing --output")),
  ],
  formatter_class=argparse.RawDescriptionHelpFormatter,
  epilog="inputs per --arch:\n"
  "  mit_b*     official mit_b*.pth ImageNet encoders; mmseg SegFormer checkpoints;\n"
  "             the public TransKD code's SegFormers; HuggingFace Segformer\n"
  "  pvt_v2_b*  official pvt_v2_b*.pth ImageNet encoders (head.* dropped);\n"
  "             HuggingFace PvtV2Model / PvtV2ForImageClassification; the public\n"
  "             code's PVTv2 teachers / students (backbone.*, neck.*, head.*)\n"
  "  lvt        lvt_imagenet_pretrained.pth.tar (backbone.*); the public code's\n"
  "             LVT students (backbone.* + linear_c*, linear_fuse, linear_pred)\n"
  "Any of them may carry DataParallel's module. and the distillation wrapper's\n"
  "student. prefixes (its CSF / PEA tensors are dropped) and sit under\n"
  "'state_dict' or 'model'. A bare encoder gets a fresh decoder (--seed).",
)


def convert_file(
  input: str,
  arch: str,
  output: str,
  num_classes=None,
  seed: int = 0,
  input_norm: str = "auto",
  overwrite: bool = False,
) -> str:
  """Reads ``input``, converts it for ``arch`` and writes ``output``; returns the line saying
  what was written."""
  resolve_arch(arch)  # before reading a large file
  state = read_state_dict(input)
  tree, num_classes = to_flax_variables(state, arch, num_classes, seed, source=input)
  layout, normalization = source_format(state)
  if input_norm != "auto":
    normalization = input_norm
  meta = record(arch, num_classes, os.path.abspath(input), layout, normalization)
  save(tree, output, meta, overwrite)
  return (
    f"wrote {storage.resolve(output)} ({meta['arch']}, {num_classes} classes, "
    f"expects {meta['normalization']} input normalisation)"
  )


def main(argv=None):
  return cli.run(PARSER, argv, convert_file)


if __name__ == "__main__":
  sys.exit(main())
