"""``--mode=eval``: a trained model's mIoU, per-class IoU and pixel accuracy on a split.

    python -m transkd_jax.main --config=configs/cityscapes.py --workdir=DIR --mode=eval \
        [--config.eval.checkpoint=CKPT] [--config.eval_protocol=reference]

Weights come from ``config.eval.checkpoint`` (a training workdir, or an Orbax
directory such as ``transkd_jax.convert`` writes), else from the workdir's best
checkpoint (by validation mIoU; its latest when none was scored). The model is
the run's trained model (the student; the teacher for ``--config.method=teacher``),
or ``config.eval.variant`` when set. Results are printed as a per-class table and
written to ``DIR/eval_results.json``. The step, the loop over the split and the two
protocols (``standard``, ``reference``) are transkd_jax/eval_step.py's.
"""

import math

import jax

from transkd_jax import build, sharding, storage
from transkd_jax.data.classes import class_names
from transkd_jax.eval_step import evaluate_split


def results_json(scores: dict, names) -> dict:
  """The eval_results.json fields; an IoU that is not defined (absent class) is null."""
  per_class = {
    name: (None if math.isnan(v) else float(v)) for name, v in zip(names, scores["per_class"])
  }
  return {
    "protocol": scores["protocol"],
    "miou": float(scores["miou"]),
    "per_class": per_class,
    "pixel_acc": float(scores["pixel_acc"]),
    "num_images": int(scores["num_images"]),
  }


def format_table(results: dict) -> str:
  """A per-class IoU table, the protocol named beside the mean."""
  width = max(len(n) for n in results["per_class"]) + 2
  lines = [f"{'class':{width}s} IoU"]
  for name, iou in results["per_class"].items():
    lines.append(f"{name:{width}s} {'  n/a' if iou is None else f'{100 * iou:5.2f}'}")
  lines.append(
    f"{'mIoU':{width}s} {100 * results['miou']:5.2f}  ({results['protocol']} protocol, "
    f"{results['num_images']} images)"
  )
  lines.append(f"{'pixel acc':{width}s} {100 * results['pixel_acc']:5.2f}")
  return "\n".join(lines)


def run_eval(config, workdir: str) -> dict:
  """``--mode=eval``: scores the configured weights on ``config.eval_split``."""
  protocol, split = config.eval_protocol, config.eval_split
  served = build.serving(config, workdir)
  print(
    f"evaluating {served.source} on {config.data.name} {split} ({protocol} protocol, "
    f"{served.input_norm[1]} input normalisation: {served.input_norm_source})",
    flush=True,
  )
  variables = sharding.put_global(served.variables, sharding.replicated(served.mesh))
  step = build.make_eval_step(config, served.mesh, input_norm=served.input_norm)
  scores = evaluate_split(config, served.mesh, step, variables, split)
  results = results_json(scores, class_names(config.data, config.num_classes))
  results.update(
    checkpoint=served.source,
    split=split,
    dataset=config.data.name,
    variant=str(served.variant),
    image_size=list(config.image_size),
  )
  print(format_table(results), flush=True)
  if jax.process_index() == 0:
    path = storage.join(workdir, "eval_results.json")
    storage.write_json(path, results, indent=2)
    print(f"wrote {path}", flush=True)
  return results
