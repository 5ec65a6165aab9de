"""Export a trained model: ONNX for deployment, HuggingFace transformers or the public layout.

    python -m transkd_jax.export --checkpoint=WORKDIR_OR_DIR --format=onnx --output=D [--argmax]
    python -m transkd_jax.export --checkpoint=WORKDIR_OR_DIR --format=hf --output=D \\
        [--normalization=auto|unit|imagenet] [--heads=1,2,5,8] [--overwrite]
    python -m transkd_jax.export --checkpoint=WORKDIR_OR_DIR --format=pytorch --output=D

``--checkpoint`` is a training run's workdir (its best checkpoint, else its
latest: the run's trained model) or a directory ``transkd_jax.convert`` wrote.
The model family (SegFormer, PVTv2, LVT) is what a convert output's
``transkd_convert.json`` records, else read off the parameter tree (PVTv2 has
``params/neck``, LVT a convolutional self-attention ``encoder/block1_0/attn/attn``,
SegFormer neither). The variant is the record's, else read off the shapes and
matched against the family's table (``transkd_jax/models/variants.py``,
``PVT_VARIANTS``, ``LVT_VARIANTS``). Attention heads leave no trace in the
shapes: a SegFormer variant that is no row of the table needs ``--heads``.

``--output`` is a local directory or a URI (``gs://...``, any ``etils.epath`` one).
``--format=hf`` (SegFormer only) writes ``D/model.safetensors``, ``config.json``
and ``preprocessor_config.json``, for
``transformers.SegformerForSemanticSegmentation.from_pretrained(D)`` and
``SegformerImageProcessor.from_pretrained(D)``. ``--format=pytorch`` (or its
alias ``public``) writes ``D/model.pth``, a state dict with the public TransKD
code's names, which its models load with ``load_state_dict(strict=True)`` and
``transkd_jax.convert`` reads back to the same variables: SegFormer's
(``block1.0.attn.kv.weight`` ..., also NVlabs'), the PVTv2 wrapper's
(``build_pvts(name, classes)``: ``backbone.*``, ``neck.*``, ``head.*``) and
LVT's (``lvt(rasa_cfg)``: ``backbone.{stage}.*``, ``linear_c*``, ``linear_fuse``,
``linear_pred``).

``--format=onnx`` (all three families) writes ``D/model.onnx`` (opset 18, standard ops
only): input ``pixels``, uint8 RGB N x 3 x H x W (H, W multiples of 32; batch, height and
width dynamic), normalised inside the graph as the weights expect; output ``logits``
(N x classes x H/4 x W/4) and, with ``--argmax``, ``labels`` (uint8 N x H x W, the
logits resized bilinearly to the input and arg-maxed). The graph is written from the
weights module by module (``transkd_jax.weights.onnx_models``); docs/deploy.md says why.

``--normalization`` is the input scaling the preprocessor config (hf) or the graph (onnx)
declares:
``unit`` (pixels / 255, no mean/std: TransKD's reference transforms),
``imagenet`` (ImageNet mean/std: official SegFormer weights, the ``mmseg``
transforms). ``auto``: a run's saved config decides (``data.transforms``, or
the older ``data.protocol``, ``mmseg`` -> imagenet, else unit); for a converted
directory, what ``transkd_convert.json`` records, else unit. The processor
resizes to the run's ``image_size`` under the reference transforms, and does
not resize otherwise (mmseg's evaluation keeps the aspect ratio, which the
processor cannot; Cityscapes' 1024 x 2048 needs no resize).

The work is done in ``transkd_jax.weights``; this module is its command line.
"""

import sys

from transkd_jax import storage
from transkd_jax.checkpoint import restore_model_variables
from transkd_jax.errors import UserError
from transkd_jax.models import archs
from transkd_jax.weights import cli
from transkd_jax.weights.hf_config import class_names, input_settings
from transkd_jax.weights.infer import infer_model
from transkd_jax.weights.layouts import to_public_state_dict
from transkd_jax.weights.record import recorded_model
from transkd_jax.weights.writers import (
  onnx_for_export,
  torch_for_export,
  write_hf,
  write_onnx,
  write_pytorch,
)

FORMATS = ("onnx", "hf", "pytorch", "public")  # public: the same as pytorch
NORMALIZATIONS = ("auto", "unit", "imagenet")


def parse_heads(text: str):
  """--heads=1,2,5,8 -> (1, 2, 5, 8); UserError unless four integers."""
  try:
    heads = tuple(int(h) for h in text.split(","))
  except ValueError:
    heads = ()
  if len(heads) != 4:
    raise UserError(f"--heads={text!r}: expected four comma-separated integers, e.g. 1,2,5,8")
  return heads


PARSER = cli.command_line(
  "transkd_jax.export",
  "Export a SegFormer, PVTv2 or LVT (a run's workdir or a transkd_jax.convert "
  "directory) as an ONNX model or a public-layout PyTorch state dict (all three), or a "
  "HuggingFace transformers directory (SegFormer).",
  [
    (
      "--checkpoint",
      dict(
        required=True,
        help="a training run's workdir or a directory transkd_jax.convert wrote",
      ),
    ),
    (
      "--format",
      dict(
        dest="fmt",
        metavar="FORMAT",
        required=True,
        help="onnx: model.onnx (uint8 NCHW pixels in, logits at 1/4 out) for SegFormer, "
        "PVTv2 and LVT; pytorch (alias public): model.pth with the public TransKD code's "
        "names, for all three; hf: a HuggingFace "
        "SegformerForSemanticSegmentation directory (SegFormer only)",
      ),
    ),
    ("--output", dict(required=True, help="directory to write")),
    (
      "--normalization",
      dict(
        default="auto",
        help="hf, onnx: the inputs the model expects: auto (from the checkpoint), "
        "unit ([0, 1] pixels) or imagenet (mean/std)",
      ),
    ),
    (
      "--heads",
      dict(
        type=parse_heads,
        default=None,
        help="attention heads per stage, e.g. 1,2,5,8; needed only for SegFormer "
        "variants that are no row of transkd_jax/models/variants.py",
      ),
    ),
    (
      "--argmax",
      dict(
        action="store_true",
        help="onnx: also output labels, the class of every input pixel (uint8 N x H x W)",
      ),
    ),
    (
      "--overwrite",
      dict(
        action="store_true",
        help="write into an existing --output, replacing the files it writes",
      ),
    ),
  ],
)


def export(
  checkpoint: str,
  fmt: str,
  output: str,
  normalization: str = "auto",
  heads=None,
  overwrite: bool = False,
  argmax: bool = False,
) -> str:
  """Writes ``output``; returns the line saying what was written."""
  if fmt not in FORMATS:
    raise UserError(f"--format={fmt!r}: expected one of {', '.join(FORMATS)}")
  if argmax and fmt != "onnx":
    raise UserError(f"--argmax: only --format=onnx has a label output (got --format={fmt})")
  if fmt in ("pytorch", "public"):
    torch_for_export()  # before anything is written
  if fmt == "onnx":
    onnx_for_export()
  if normalization not in NORMALIZATIONS:
    raise UserError(
      f"--normalization={normalization!r}: expected one of {', '.join(NORMALIZATIONS)}"
    )
  output = storage.resolve(output)
  if storage.exists(output) and not storage.isdir(output):
    raise UserError(f"--output {output} is a file; expected a directory to write")
  if storage.exists(output) and not overwrite:
    raise UserError(f"--output {output} exists; choose a new directory or pass --overwrite")

  variables, source = restore_model_variables(checkpoint, "--checkpoint", with_source=True)
  family, name, spec, num_classes = infer_model(variables, heads, recorded_model(checkpoint))
  label = archs.ARCHS[family].label
  if fmt == "hf" and family != "segformer":
    raise UserError(
      f"--format=hf: the HuggingFace export is for SegFormer only; --checkpoint "
      f"holds a {label} ({name}). --format=pytorch writes it in the public "
      "code's layout"
    )
  what = f"{name or 'custom MiT ' + str(spec.channels)}, {num_classes} classes"
  storage.makedirs(output)
  if fmt in ("pytorch", "public"):
    write_pytorch(to_public_state_dict(variables, family), output)
    return (
      f"wrote {storage.join(output, 'model.pth')} (public {label} layout; {what}) from {source}"
    )
  norm, why, image_size, data = input_settings(checkpoint, normalization, source)
  names = class_names(num_classes, data)
  if fmt == "onnx":
    path = storage.join(output, "model.onnx")
    write_onnx(variables, family, name, spec, num_classes, norm, argmax, names, path)
    outputs = "logits and labels" if argmax else "logits"
    return (
      f"wrote {path} ({label}; {what}; uint8 pixels, {norm} normalisation from {why}; "
      f"{outputs}) from {source}"
    )
  public = to_public_state_dict(variables, family)
  write_hf(public, spec, num_classes, output, norm, image_size, names)
  return (
    f"wrote {output} (HuggingFace SegFormer; {what}; {norm} normalisation from {why}) from {source}"
  )


def main(argv=None):
  return cli.run(PARSER, argv, export)


if __name__ == "__main__":
  sys.exit(main())
