"""``--mode=predict``: label, colour and overlay PNGs for images of any size.

    python -m transkd_jax.main --config=configs/cityscapes.py --workdir=DIR --mode=predict \\
        --config.predict.input='/data/cityscapes/leftImg8bit/val' \\
        [--config.eval.checkpoint=CKPT] [--config.predict.cityscapes_format=True]

``config.predict.input`` is an image file, a directory (searched recursively
for .png/.jpg/.jpeg/.bmp/.tif/.tiff/.webp) or a glob, local or a URI
(``gs://...``; there a glob has no ``**``). Weights come from the
same place as ``--mode=eval``'s (``transkd_jax/build.py: serving``).

For every image ``<dir>/<name>.<ext>`` (``_leftImg8bit`` / ``_rgb_anon``
dropped from the name) it writes, under ``config.predict.output_dir``
(default ``WORKDIR/predictions``) and keeping the input's sub-directories:

- ``<name>_trainIds.png``: class ids (train ids; 255 never appears), 8-bit grey;
- ``<name>_color.png``: the dataset's palette (Cityscapes', VOC's, NYUv2's);
- ``<name>_overlay.png``: the colours blended over the image
  (``config.predict.overlay_alpha``);
- with ``config.predict.cityscapes_format=True``, also
  ``cityscapes/<name>_labelIds.png``: Cityscapes label ids, the files
  cityscapesScripts' ``evalPixelLevelSemanticLabeling`` (point
  ``CITYSCAPES_RESULTS`` at ``.../predictions/cityscapes``) and the benchmark
  server read.

All outputs are at the input's full resolution. ``config.predict.resize=True``
(default) shows the model the image as evaluation does (``config.data.transforms``:
resized to ``config.image_size``, or fit to ``mmseg_scale`` and normalised)
and resizes the logits back (bilinear); ``False`` runs at the native
resolution, padded to a multiple of 32 and cropped back.
Consecutive images of one size are batched (``config.batch_size``).
"""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from PIL import Image
from tqdm import tqdm

from transkd_jax import build, normalization, storage
from transkd_jax.data import transforms
from transkd_jax.data.classes import (
  CITYSCAPES_NAMES,
  CITYSCAPES_TRAIN_TO_ID,
  class_names,
  colorize,
  overlay,
  palette,
)
from transkd_jax.data.sources import read_image
from transkd_jax.errors import UserError
from transkd_jax.eval_step import predictions_at

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_NAME_SUFFIXES = ("_leftImg8bit", "_rgb_anon")


def list_inputs(pattern: str):
  """[(path, output stem relative to the output dir)] for a file, directory or glob."""
  if not pattern:
    raise UserError(
      "config.predict.input is empty: set it to an image file, a directory or a "
      "glob, e.g. --config.predict.input='/data/images/*.png'"
    )
  pattern = os.path.expanduser(pattern)
  uri = storage.is_uri(pattern)
  if uri and "**" in pattern:
    raise UserError(
      f"config.predict.input={pattern!r}: ** is not supported in a URI (gs://...) pattern; "
      "expected a directory (searched at every depth), a file or a pattern with * per level"
    )
  if storage.isdir(pattern):
    paths = [
      p
      for p in storage.files_under(pattern)
      if p.lower().endswith(IMAGE_EXTENSIONS) and (uri or os.path.isfile(p))
    ]
    base = pattern
  else:
    # A URI's matches are taken as files: a check each would be a request per image.
    paths = [p for p in storage.glob(pattern) if uri or os.path.isfile(p)]
    base = None
  if not paths:
    what = "holds no images" if base else "matches no files"
    raise UserError(
      f"config.predict.input={pattern!r} {what} (looked for {', '.join(IMAGE_EXTENSIONS)})"
    )
  out = []
  for path in paths:
    rel = storage.relpath(path, base) if base else path.rsplit("/", 1)[-1]
    stem = os.path.splitext(rel)[0]
    for suffix in _NAME_SUFFIXES:
      if stem.endswith(suffix):
        stem = stem[: -len(suffix)]
    out.append((path, stem))
  return out


def model_input(image: np.ndarray, config) -> np.ndarray:
  """The uint8 image the model sees (resized, or at its size padded to a multiple of 32)."""
  if config.predict.resize:
    return transforms.eval_image(image, config)
  h, w = image.shape[:2]
  out = transforms.eval_image(image, config, (h, w))
  padded = np.empty((-(-h // 32) * 32, -(-w // 32) * 32, 3), out.dtype)
  padded[...] = transforms.image_fill(config)
  padded[:h, :w] = out
  return padded


def make_predict_fn(model, resize: bool, input_norm=("unit", "unit")):
  """predict(variables, images, (h, w)) -> class ids at (h, w), jitted per output size.

  ``input_norm``: (the images' normalisation, the weights'), as ``build.Serving.input_norm``.
  """

  def predict(variables, images, size):
    images = normalization.renormalize(images, *input_norm)
    logits = model.apply(variables, images, train=False)["logits"]
    if resize:
      return predictions_at(logits, size, model.kernels)
    full = (images.shape[1], images.shape[2])
    return predictions_at(logits, full, model.kernels)[:, : size[0], : size[1]]

  return jax.jit(predict, static_argnums=2)


def write_outputs(
  out_dir: str,
  stem: str,
  image: np.ndarray,
  ids: np.ndarray,
  colours,
  alpha: float,
  cityscapes_format: bool,
):
  """Writes the PNGs of one image (to a local directory or a gs:// one); returns their paths."""
  base = storage.join(out_dir, stem)
  colour = colorize(ids, colours)
  pngs = {
    base + "_trainIds.png": ids.astype(np.uint8),
    base + "_color.png": colour,
    base + "_overlay.png": overlay(image, colour, alpha),
  }
  if cityscapes_format:
    pngs[storage.join(out_dir, "cityscapes", stem + "_labelIds.png")] = CITYSCAPES_TRAIN_TO_ID[ids]
  for path, array in pngs.items():
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
      Image.fromarray(array).save(f, format="PNG")
  return list(pngs)


def run_predict(config, workdir: str) -> dict:
  """``--mode=predict``: writes the PNGs; returns {"images", "output_dir", "imgs_per_s"}."""
  inputs = list_inputs(config.predict.input)
  names = class_names(config.data, config.num_classes)
  if config.predict.cityscapes_format and tuple(names) != CITYSCAPES_NAMES:
    raise UserError(
      f"config.predict.cityscapes_format=True needs Cityscapes' 19 classes; "
      f"config.data.name={config.data.name!r} with config.num_classes="
      f"{config.num_classes} has other classes"
    )
  served = build.serving(config, workdir)
  model, source = served.model, served.source
  variables = jax.device_put(served.variables)  # once, not per batch (each process its own)
  out_dir = storage.resolve(config.predict.output_dir or storage.join(workdir, "predictions"))
  colours = palette(config.data, config.num_classes)
  predict = make_predict_fn(model, bool(config.predict.resize), served.input_norm)
  writer = jax.process_index() == 0
  print(f"predicting {len(inputs)} images with {source} -> {out_dir}", flush=True)
  bar = tqdm(total=len(inputs), unit="img", disable=not writer, dynamic_ncols=True)
  start = time.perf_counter()
  pending = []  # (stem, image) of one size

  def flush():
    size = pending[0][1].shape[:2]
    batch = np.stack([model_input(image, config) for _, image in pending])
    ids = np.asarray(predict(variables, jnp.asarray(batch), size))
    for (stem, image), pred in zip(pending, ids):
      if writer:
        write_outputs(
          out_dir,
          stem,
          image,
          pred,
          colours,
          float(config.predict.overlay_alpha),
          bool(config.predict.cityscapes_format),
        )
    bar.update(len(pending))
    pending.clear()

  for path, stem in inputs:
    image = read_image(path)
    if pending and (pending[0][1].shape != image.shape or len(pending) == config.batch_size):
      flush()
    pending.append((stem, image))
  flush()
  bar.close()
  elapsed = time.perf_counter() - start
  print(
    f"wrote predictions of {len(inputs)} images to {out_dir} ({len(inputs) / elapsed:.2f} img/s)",
    flush=True,
  )
  return {"images": len(inputs), "output_dir": out_dir, "imgs_per_s": len(inputs) / elapsed}
