"""The method table, the training-time wrapper, and the distillation objective.

A method is a row of data that holds its own parts: the ``adapter`` that turns
the student's stage maps into teacher-comparable maps, whether and how the
patch embeddings are aligned (PEA, with GL-Mixer or the Embedding Assistant),
and the loss ``terms`` added to the cross-entropy. Each ``Term`` names the
``config.distill`` keys it reads and the student and teacher outputs it
compares. Adding a method is adding a row.

``Distiller`` holds the trained model (any family of ``transkd_jax.models.archs``)
and the method's modules; their
parameters live side by side under the trained model's role ("student", or
"teacher" for a teacher run), "fusion", "pea", "gl_mixer", "assistant" and
"embed_fuse". ``objective`` turns teacher and student outputs into named loss
terms. The deployed model is ``params[method.trains]``: a plain segmentation model.
The modules take their widths from the two models' stage shapes, so any pair
whose stage maps share strides distils.
"""

import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from transkd_jax.distill import losses
from transkd_jax.distill.baselines import FitNetAdapters, ReviewFusion
from transkd_jax.distill.csf import CrossSelectiveFusion
from transkd_jax.distill.ea import EmbeddingAssistant, EmbeddingFuse
from transkd_jax.distill.gl_mixer import GLMixer
from transkd_jax.distill.pea import PatchEmbedAlignment
from transkd_jax.models import archs

Dtype = Any


@dataclasses.dataclass(frozen=True)
class Term:
  """One weighted loss term: ``fn(student_value, teacher_value, settings)``.

  ``student`` is the Distiller output it reads ("adapted", "aligned" or
  "logits"), ``teacher`` the teacher output it compares with ("features",
  "embeddings" or "logits"), ``keys`` the ``config.distill`` keys it needs.
  """

  name: str
  student: str
  teacher: str
  keys: Tuple[str, ...]
  fn: Callable


def _stage_targets(adapted, features):
  """The teacher stage maps an adapter's outputs pair with (its last stages)."""
  return features[-len(adapted) :]


HCL = Term(
  "hcl",
  "adapted",
  "features",
  ("hcl_weight",),
  lambda s, t, w: w["hcl_weight"] * losses.hcl(s, _stage_targets(s, t)),
)
FITNET = Term(
  "fitnet",
  "adapted",
  "features",
  ("fitnet_weights",),
  lambda s, t, w: losses.weighted_mse(s, _stage_targets(s, t), w["fitnet_weights"]),
)
CWD = Term(
  "cwd",
  "adapted",
  "features",
  ("cwd_weight", "cwd_temperature"),
  lambda s, t, w: (
    w["cwd_weight"]
    * sum(losses.cwd(a, b, w["cwd_temperature"]) for a, b in zip(s, _stage_targets(s, t)))
  ),
)
PEA = Term(
  "pea",
  "aligned",
  "embeddings",
  ("pea_weights",),
  lambda s, t, w: losses.weighted_mse(s, t, w["pea_weights"]),
)
LOGIT_KD = Term(
  "kd",
  "logits",
  "logits",
  ("kd_weight", "kd_temperature"),
  lambda s, t, w: w["kd_weight"] * losses.logit_kd(s, t, w["kd_temperature"]),
)


def csf(channels, d: "Distiller", **kw):
  return CrossSelectiveFusion(channels, d.fusion_channels, d.kernels, **kw)


def abf(channels, d: "Distiller", **kw):
  return ReviewFusion(channels, d.fusion_channels, d.kernels, **kw)


def fitnet_adapters(channels, d: "Distiller", **kw):
  return FitNetAdapters(channels, **kw)


@dataclasses.dataclass(frozen=True)
class Method:
  """One row of the method table."""

  name: str
  description: str
  adapter: Optional[Callable[..., nn.Module]] = None  # (teacher channels, Distiller, **dtypes)
  align_embeddings: bool = False  # PEA: one projection per stage to teacher width
  gl_mixer: bool = False  # GL-Mixer on the stage-4 embedding before its projection
  assistant: bool = False  # Embedding Assistant fused into the aligned embeddings
  terms: Tuple[Term, ...] = ()  # added to the cross-entropy
  trains: str = "student"  # the config section (role) of the model trained

  @property
  def teacher_call(self) -> Optional[str]:
    """What the teacher must compute: None, "encode" (no head) or "full"."""
    if any(t.teacher == "logits" for t in self.terms):
      return "full"
    return "encode" if self.terms else None

  @property
  def setting_keys(self) -> Tuple[str, ...]:
    return tuple(k for t in self.terms for k in t.keys)


METHODS: Dict[str, Method] = {
  m.name: m
  for m in (
    Method("student", "the student alone, no distillation"),
    Method(
      "teacher",
      "the teacher alone (config.teacher.variant, from config.teacher.init)",
      trains="teacher",
    ),
    # The ablation's two steps before TransKD-Base (config.recipe.ablation).
    Method(
      "hcl",
      "ablation: HCL on the stage maps through 1x1 adapters (no CSF, no PEA)",
      fitnet_adapters,
      terms=(HCL,),
    ),
    Method("csf", "ablation: CSF + HCL (TransKD-Base without PEA)", csf, terms=(HCL,)),
    Method(
      "transkd_base", "TransKD-Base: CSF + HCL, PEA", csf, align_embeddings=True, terms=(HCL, PEA)
    ),
    Method(
      "transkd_gl",
      "TransKD-GL: CSF + HCL, PEA with GL-Mixer on stage 4",
      csf,
      align_embeddings=True,
      gl_mixer=True,
      terms=(HCL, PEA),
    ),
    Method(
      "transkd_ea",
      "TransKD-EA: CSF + HCL, PEA with Embedding Assistant",
      csf,
      align_embeddings=True,
      assistant=True,
      terms=(HCL, PEA),
    ),
    Method("kd", "logit KD (Hinton), temperature T (no public implementation)", terms=(LOGIT_KD,)),
    Method(
      "cwd",
      "channel-wise distillation on the four CSF outputs, PEA (as the public "
      "train_TransKDBase.py --knowledge-distillation-loss=CWloss)",
      csf,
      align_embeddings=True,
      terms=(CWD, PEA),
    ),
    Method("reviewkd", "ReviewKD: ABF fusion + HCL", abf, terms=(HCL,)),
    Method(
      "fitnet",
      "FitNet: 1x1 adapters + MSE (no public implementation)",
      fitnet_adapters,
      terms=(FITNET,),
    ),
  )
}


def get_method(name: str) -> Method:
  if name not in METHODS:
    raise ValueError(f"unknown distillation method {name!r}; expected one of {', '.join(METHODS)}")
  return METHODS[name]


def loss_settings(method: Method, distill_config: Optional[Mapping]) -> Dict[str, Any]:
  """The loss weights the method's terms read, from ``config.distill``.

  Raises ValueError naming ``config.distill.<key>`` when one is missing or
  malformed, so a bad config fails before anything is compiled.
  """
  settings = {}
  for key in method.setting_keys:
    if distill_config is None or key not in distill_config:
      raise ValueError(f"method {method.name!r} needs config.distill.{key}, which is missing")
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


class Distiller(nn.Module):
  """The trained model plus the training-time modules of one method.

  ``__call__(images, train)`` returns the model's outputs ("logits",
  "features", "embeddings") and the method's "adapted" stage maps (to compare
  with the teacher's stage maps) and "aligned" patch embeddings (to compare with
  the teacher's embeddings); either may be None.
  """

  method: Method
  variant: Any = "b0"  # the trained model's
  teacher_variant: Any = "b2"  # with teacher_arch, gives the adapters' output widths
  num_classes: int = 19
  fusion_channels: int = 64
  gl_heads: int = 8
  gl_residual: bool = False
  gl_mix_init: Tuple[float, float] = (1.0, 1.0)
  kernels: str = "native"  # "cpu" | "native" | "tpu": transkd_jax/models/kernels.py
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  arch: str = "segformer"  # the trained model's family (transkd_jax/models/archs.py)
  remat: str = "none"  # the trained model's encoder blocks (models/base.py REMAT_POLICIES)
  teacher_arch: str = "segformer"

  @nn.compact
  def __call__(self, images, train: bool = False):
    method = self.method
    teacher = archs.stage_channels(self.teacher_arch, self.teacher_variant)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    model = archs.ARCHS[self.arch].model(
      variant=self.variant,
      num_classes=self.num_classes,
      kernels=self.kernels,
      remat=self.remat,
      name=method.trains,
      **kw,
    )
    out = dict(model(images, train))
    out["adapted"] = (
      method.adapter(teacher, self, name="fusion", **kw)(out["features"], train)
      if method.adapter
      else None
    )
    out["aligned"] = None
    if method.align_embeddings:
      embeddings = list(out["embeddings"])
      if method.gl_mixer:
        embeddings[3] = GLMixer(
          self.gl_heads,
          self.gl_residual,
          tuple(self.gl_mix_init),
          kernels=self.kernels,
          name="gl_mixer",
          **kw,
        )(embeddings[3])
      aligned = PatchEmbedAlignment(teacher, name="pea", **kw)(embeddings)
      if method.assistant:
        assistant = EmbeddingAssistant(teacher, name="assistant", **kw)(images, out["features"])
        aligned = EmbeddingFuse(self.param_dtype, name="embed_fuse")(aligned, assistant)
      out["aligned"] = aligned
    return out


def _check_pairs(what: str, student, teacher):
  if not isinstance(student, (list, tuple)):
    if student.shape != teacher.shape:
      raise ValueError(
        f"{what}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} do not pair"
      )
    return
  teacher = teacher[-len(student) :]
  first = 5 - len(student)
  for stage, (s, t) in enumerate(zip(student, teacher), start=first):
    if s.shape != t.shape:
      raise ValueError(
        f"{what}, stage {stage}: student {tuple(s.shape)} and teacher {tuple(t.shape)} do not pair"
      )


_WHAT = {"features": "feature maps", "embeddings": "patch embeddings", "logits": "logits"}


def check_outputs(method: Method, student_out: Mapping, teacher_out: Mapping):
  """Raises ValueError naming the term and stage where student and teacher do not pair."""
  for term in method.terms:
    _check_pairs(
      f"{method.name}: {_WHAT[term.teacher]}", student_out[term.student], teacher_out[term.teacher]
    )


def check_pairing(distiller: Distiller, teacher: nn.Module, image_size: Sequence[int]):
  """Checks, from shapes alone, that the method's outputs pair with the teacher's.

  Runs nothing (``jax.eval_shape``); raises ValueError naming the stage whose
  student-side map or embedding does not match the teacher's, so a bad pairing
  fails before anything is compiled.
  """
  method = distiller.method
  if method.teacher_call is None:
    return
  images = jax.ShapeDtypeStruct((1, *image_size, 3), jnp.float32)
  key = jax.random.key(0)

  def shapes(model, **kw):
    def run(x):
      return model.apply(model.init(key, x, **kw), x, **kw)

    return jax.eval_shape(run, images)

  encode = {"method": "encode"} if method.teacher_call == "encode" else {}
  check_outputs(method, shapes(distiller), shapes(teacher, **encode))


def objective(
  method: Method,
  settings: Mapping[str, Any],
  student_out: Mapping,
  teacher_out: Optional[Mapping],
  labels,
  class_weights: Optional[Sequence[float]] = None,
  ce_logits=None,
):
  """The training loss: (total, {term: value}) with every term already weighted.

  ``student_out`` is ``Distiller``'s output; ``teacher_out`` the teacher's
  (its ``encode`` or full output, per ``Method.teacher_call``), which is
  put under ``stop_gradient`` here so no gradient ever reaches the teacher.
  ``settings`` comes from ``loss_settings``. Terms: "ce" always, then the
  method's. ``ce_logits`` (default: the student's logits) are what the
  cross-entropy compares with ``labels``, e.g. logits upsampled to
  full-resolution labels.
  """
  ce_logits = student_out["logits"] if ce_logits is None else ce_logits
  terms = {"ce": losses.cross_entropy(ce_logits, labels, class_weights)}
  if method.terms:
    if teacher_out is None:
      raise ValueError(f"method {method.name!r} needs the teacher's outputs")
    teacher_out = jax.lax.stop_gradient(teacher_out)
    check_outputs(method, student_out, teacher_out)
  for term in method.terms:
    terms[term.name] = term.fn(student_out[term.student], teacher_out[term.teacher], settings)
  return sum(terms.values()), terms
