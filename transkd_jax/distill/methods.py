"""The method table, the training-time wrapper, and the distillation objective.

A method is a row of data: which adapter turns the student's stage maps into
teacher-comparable maps (``fusion``), which loss compares them
(``feature_loss``), which path aligns the patch embeddings (``embedding``), and
whether the teacher's logits are distilled (``logit_kd``). ``Distiller`` holds
the student and the method's adapters (their parameters live side by side
under "student", "fusion", "pea", "gl_mixer", "assistant", "embed_fuse"), and
``objective`` turns teacher and student outputs into named loss terms.

The deployed model is ``params["student"]``: a plain SegFormer.
"""

import dataclasses
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from transkd_jax.distill import losses
from transkd_jax.distill.baselines import CWDAdapter, FitNetAdapters, ReviewFusion
from transkd_jax.distill.csf import CrossSelectiveFusion
from transkd_jax.distill.ea import EmbeddingAssistant, EmbeddingFuse
from transkd_jax.distill.gl_mixer import GLMixer
from transkd_jax.distill.pea import PatchEmbedAlignment
from transkd_jax.models import SegFormer
from transkd_jax.models.variants import get_variant

Dtype = Any


@dataclasses.dataclass(frozen=True)
class Method:
  fusion: Optional[str] = None        # "csf" | "abf" | "fitnet" | "cwd"
  feature_loss: Optional[str] = None  # "hcl" | "fitnet" | "cwd"
  embedding: Optional[str] = None     # "pea" | "gl" | "ea"
  logit_kd: bool = False
  description: str = ""

  @property
  def teacher_call(self) -> Optional[str]:
    """What the teacher must compute: None, "encode" (no head) or "full"."""
    if self.logit_kd:
      return "full"
    if self.fusion or self.embedding:
      return "encode"
    return None


METHODS: Dict[str, Method] = {
    "student": Method(description="the student alone, no distillation"),
    "transkd_base": Method("csf", "hcl", "pea",
                           description="TransKD-Base: CSF + HCL, PEA"),
    "transkd_gl": Method("csf", "hcl", "gl",
                         description="TransKD-GL: CSF + HCL, PEA with GL-Mixer on stage 4"),
    "transkd_ea": Method("csf", "hcl", "ea",
                         description="TransKD-EA: CSF + HCL, PEA with Embedding Assistant"),
    "kd": Method(logit_kd=True, description="logit KD (Hinton), temperature T"),
    "cwd": Method("cwd", "cwd", description="channel-wise distillation on stage 4"),
    "reviewkd": Method("abf", "hcl", description="ReviewKD: ABF fusion + HCL"),
    "fitnet": Method("fitnet", "fitnet", description="FitNet: 1x1 adapters + MSE"),
}


def get_method(name: str) -> Method:
  if name not in METHODS:
    raise ValueError(f"unknown distillation method {name!r}; expected one of "
                     f"{', '.join(METHODS)}")
  return METHODS[name]


# The config keys (under config.distill) each part of a method reads.
_WEIGHT_KEYS = {
    "hcl": ("hcl_weight",),
    "fitnet": ("fitnet_weights",),
    "cwd": ("cwd_weight", "cwd_temperature"),
    "pea": ("pea_weights",),
    "kd": ("kd_weight", "kd_temperature"),
}


def loss_settings(method_name: str, distill_config: Mapping) -> Dict[str, Any]:
  """The loss weights the method needs, read from ``config.distill``.

  Raises ValueError naming ``config.distill.<key>`` when one is missing or
  malformed, so a bad config fails before anything is compiled.
  """
  method = get_method(method_name)
  needed = []
  if method.feature_loss:
    needed += _WEIGHT_KEYS[method.feature_loss]
  if method.embedding:
    needed += _WEIGHT_KEYS["pea"]
  if method.logit_kd:
    needed += _WEIGHT_KEYS["kd"]
  settings = {}
  for key in needed:
    if distill_config is None or key not in distill_config:
      raise ValueError(f"method {method_name!r} needs config.distill.{key}, which is missing")
    value = distill_config[key]
    if key.endswith("_weights"):
      value = tuple(float(v) for v in value)
      if len(value) != 4:
        raise ValueError(f"config.distill.{key} needs 4 values (stages 1-4), got {value}")
    else:
      value = float(value)
      if key.endswith("temperature") and value <= 0:
        raise ValueError(f"config.distill.{key} must be positive, got {value}")
    settings[key] = value
  return settings


def check_pairing(distiller: "Distiller", teacher: SegFormer, image_size: Sequence[int]):
  """Checks, from shapes alone, that the method's outputs pair with the teacher's.

  Runs nothing (``jax.eval_shape``); raises ValueError naming the stage whose
  student-side map or embedding does not match the teacher's, so a bad pairing
  fails before anything is compiled.
  """
  images = jax.ShapeDtypeStruct((1, *image_size, 3), jnp.float32)
  key = jax.random.key(0)

  def shapes(model, **kw):
    def run(x):
      variables = model.init(key, x, **kw)
      return model.apply(variables, x, **kw)
    return jax.eval_shape(run, images)

  method = get_method(distiller.method)
  if method.teacher_call is None:
    return
  student = shapes(distiller)
  teacher = shapes(teacher) if method.teacher_call == "full" else shapes(
      teacher, method="encode")
  _check_outputs(distiller.method, student, teacher)


class Distiller(nn.Module):
  """The student plus the training-time modules of one method.

  ``__call__(images, train)`` returns the student's outputs ("logits",
  "features", "embeddings") and the method's "adapted" stage maps (to compare
  with the teacher's stage maps) and "aligned" patch embeddings (to compare with
  the teacher's embeddings); either may be None.
  """
  method: str
  student_variant: Any = "b0"
  teacher_variant: Any = "b2"
  num_classes: int = 19
  fusion_channels: int = 64
  gl_heads: int = 8
  gl_residual: bool = False
  gl_mix_init: Tuple[float, float] = (1.0, 1.0)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    method = get_method(self.method)
    teacher = get_variant(self.teacher_variant).channels
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.student = SegFormer(self.student_variant, self.num_classes, **kw)
    fusion = {
        None: None,
        "csf": lambda: CrossSelectiveFusion(teacher, self.fusion_channels, **kw),
        "abf": lambda: ReviewFusion(teacher, self.fusion_channels, **kw),
        "fitnet": lambda: FitNetAdapters(teacher, **kw),
        "cwd": lambda: CWDAdapter(teacher, **kw),
    }[method.fusion]
    self.fusion = fusion() if fusion else None
    if method.embedding:
      self.pea = PatchEmbedAlignment(teacher, **kw)
    if method.embedding == "gl":
      self.gl_mixer = GLMixer(self.gl_heads, self.gl_residual, tuple(self.gl_mix_init), **kw)
    if method.embedding == "ea":
      self.assistant = EmbeddingAssistant(teacher, **kw)
      self.embed_fuse = EmbeddingFuse(self.param_dtype)

  def __call__(self, images, train: bool = False):
    method = get_method(self.method)
    out = dict(self.student(images, train))
    out["adapted"] = self.fusion(out["features"], train) if self.fusion else None
    out["aligned"] = None
    if method.embedding:
      embeddings = list(out["embeddings"])
      if method.embedding == "gl":
        embeddings[3] = self.gl_mixer(embeddings[3])
      aligned = self.pea(embeddings)
      if method.embedding == "ea":
        aligned = self.embed_fuse(aligned, self.assistant(images, out["features"]))
      out["aligned"] = aligned
    return out


def build_distiller(config) -> Distiller:
  """The Distiller of ``config`` (method, teacher/student variants, classes, dtype)."""
  get_method(config.method)
  d = config.get("distill", {}) or {}
  dtype = jnp.dtype(config.get("dtype", "float32"))
  return Distiller(method=config.method, student_variant=config.student.variant,
                   teacher_variant=config.teacher.variant, num_classes=config.num_classes,
                   fusion_channels=int(d.get("fusion_channels", 64)),
                   gl_heads=int(d.get("gl_heads", 8)),
                   gl_residual=bool(d.get("gl_residual", False)),
                   gl_mix_init=tuple(d.get("gl_mix_init", (1.0, 1.0))), dtype=dtype)


def _check_pairs(what: str, student: Sequence, teacher: Sequence, first_stage: int = 1):
  for stage, (s, t) in enumerate(zip(student, teacher), start=first_stage):
    if s.shape != t.shape:
      raise ValueError(f"{what}, stage {stage}: student {tuple(s.shape)} and teacher "
                       f"{tuple(t.shape)} do not pair")


def _check_outputs(method_name: str, student_out: Mapping, teacher_out: Mapping):
  """Raises ValueError naming the stage where student and teacher do not pair."""
  method = get_method(method_name)
  if method.feature_loss:
    adapted = student_out["adapted"]
    _check_pairs(f"{method_name}: feature maps", adapted,
                 teacher_out["features"][-len(adapted):], first_stage=5 - len(adapted))
  if method.embedding:
    _check_pairs(f"{method_name}: patch embeddings", student_out["aligned"],
                 teacher_out["embeddings"])
  if method.logit_kd and student_out["logits"].shape != teacher_out["logits"].shape:
    raise ValueError(f"{method_name}: student logits {tuple(student_out['logits'].shape)} and "
                     f"teacher logits {tuple(teacher_out['logits'].shape)} do not pair")


def objective(method_name: str, settings: Mapping[str, Any], student_out: Mapping,
              teacher_out: Optional[Mapping], labels,
              class_weights: Optional[Sequence[float]] = None, ce_logits=None):
  """The training loss: (total, {term: value}) with every term already weighted.

  ``student_out`` is ``Distiller``'s output; ``teacher_out`` the teacher's
  (``SegFormer.encode`` or full output, per ``Method.teacher_call``), which is
  put under ``stop_gradient`` here so no gradient ever reaches the teacher.
  ``settings`` comes from ``loss_settings``. Terms: "ce" always; "hcl",
  "fitnet" or "cwd" for the feature loss; "pea" for the embedding path; "kd"
  for logit KD. ``total`` is their sum. ``ce_logits`` (default: the student's
  logits) are what the cross-entropy compares with ``labels``, e.g. logits
  upsampled to full-resolution labels.
  """
  method = get_method(method_name)
  ce_logits = student_out["logits"] if ce_logits is None else ce_logits
  terms = {"ce": losses.cross_entropy(ce_logits, labels, class_weights)}
  if method.teacher_call is not None:
    if teacher_out is None:
      raise ValueError(f"method {method_name!r} needs the teacher's outputs")
    teacher_out = jax.lax.stop_gradient(teacher_out)
  _check_outputs(method_name, student_out, teacher_out)
  if method.feature_loss:
    adapted = student_out["adapted"]
    targets = teacher_out["features"][-len(adapted):]
    if method.feature_loss == "hcl":
      terms["hcl"] = settings["hcl_weight"] * losses.hcl(adapted, targets)
    elif method.feature_loss == "fitnet":
      terms["fitnet"] = losses.weighted_mse(adapted, targets, settings["fitnet_weights"])
    elif method.feature_loss == "cwd":
      terms["cwd"] = settings["cwd_weight"] * sum(
          losses.cwd(s, t, settings["cwd_temperature"]) for s, t in zip(adapted, targets))
  if method.embedding:
    aligned = student_out["aligned"]
    terms["pea"] = losses.weighted_mse(aligned, teacher_out["embeddings"],
                                       settings["pea_weights"])
  if method.logit_kd:
    terms["kd"] = settings["kd_weight"] * losses.logit_kd(
        student_out["logits"], teacher_out["logits"], settings["kd_temperature"])
  total = sum(terms.values())
  return total, terms
