"""The train state and the one jit-compiled, sharded train step.

One step: the frozen teacher's forward (only what the method needs: its
encoder, or its whole model for logit KD; optionally in bfloat16), the
student + distillation modules' forward and backward, the distillation
objective, AdamW. The state is donated; batches are split along the mesh's
``data`` axis and parameters laid out by ``config.sharding``.
"""

from typing import Any, Callable, Dict, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from transkd_jax import normalization, sharding
from transkd_jax.distill import Distiller, Method, objective
from transkd_jax.models import SegFormer
from transkd_jax.models.resize import resize_bilinear


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  params: Any
  batch_stats: Any
  opt_state: Any

  def as_dict(self) -> Dict[str, Any]:
    """The plain pytree checkpoints store."""
    return {
      "step": self.step,
      "params": self.params,
      "batch_stats": self.batch_stats,
      "opt_state": self.opt_state,
    }


def init_state(
  model: Distiller, optimizer, image_shape, seed: int, initial_model: Optional[dict] = None
) -> TrainState:
  """A fresh state (parameters from ``seed``; optionally the trained model's replaced)."""
  variables = model.init(jax.random.key(seed), jnp.zeros((1, *image_shape, 3), jnp.float32))
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  if initial_model is not None:  # e.g. converted ImageNet weights for the trained model
    role = model.method.trains
    params = {**params, role: initial_model["params"]}
    if initial_model.get("batch_stats"):  # PVTv2 has no BatchNorm
      batch_stats = {**batch_stats, role: initial_model["batch_stats"]}
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=batch_stats,
    opt_state=optimizer.init(params),
  )


def logits_for_ce(logits, labels, kernels: str = "native"):
  """Logits at the labels' resolution for the cross-entropy.

  The reference protocol gives labels at the logits' 1/4 resolution (no-op);
  the mmseg protocol gives full-resolution labels, and, as mmseg, the logits
  are upsampled bilinearly (align_corners=False) to them.
  """
  if labels.shape[1:3] == logits.shape[1:3]:
    return logits
  return resize_bilinear(logits, labels.shape[1:3], kernels)


def split_micro_batches(x, k: int, mesh=None):
  """(B, ...) -> (k, B / k, ...): micro-batch j holds examples j, j + k, j + 2k, ... so
  that each device's share of the batch (a contiguous block along ``data``) gives every
  micro-batch the same number of examples, and no example moves between devices."""
  x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, sharding.micro_batch_sharding(mesh))


def make_train_step(
  model: Distiller,
  teacher: Optional[SegFormer],
  method: Method,
  settings: Dict[str, Any],
  optimizer,
  schedule,
  seed: int,
  class_weights=None,
  mesh=None,
  teacher_input=("unit", "unit"),
  param_shardings=None,
  grad_accum_steps: int = 1,
) -> Callable:
  """step(state, teacher_variables, batch) -> (state, metrics); not yet jitted.

  With a ``mesh``, the variables are gathered whole onto every device where
  they are used (FSDP: stored split along ``model``, all-gathered for the
  forward and backward) and the activations stay split by example. Without
  this, XLA's sharding propagation may split activations along ``model``
  instead, and gather them. The gradients are constrained back to
  ``param_shardings`` (the stored layout) in the backward pass, so each device
  receives only its shard (a reduce-scatter), not the whole gradient.

  ``teacher_input`` = (the student's normalisation, the teacher's): the batch's
  uint8 pixels are normalised on the device, for each model its own way
  (transkd_jax/normalization.py).

  ``grad_accum_steps`` = k > 1: the batch is split into k micro-batches
  (``split_micro_batches``), each run forward and backward in turn (a ``lax.scan``, so
  only one micro-batch's activations are alive), and the update uses the mean of their
  gradients: one batch k times larger than a micro-batch, in the memory of one. The
  loss is each micro-batch's own mean, so the update equals the whole batch's where
  every micro-batch has as many labelled pixels. BatchNorm (the SegFormer and LVT
  heads', and the fusion modules' of TransKD and ReviewKD) normalises each micro-batch
  by its own statistics and updates its running statistics k times, as gradient
  accumulation in PyTorch does; so with BatchNorm the update is close to, not equal
  to, the whole batch's.
  """
  teacher_call = method.teacher_call
  class_weights = None if not class_weights else tuple(float(w) for w in class_weights)
  base_key = jax.random.key(seed)

  def whole(tree):
    if mesh is None:
      return tree
    return jax.lax.with_sharding_constraint(tree, sharding.replicated(mesh))

  @jax.custom_vjp
  def gathered(params):
    return whole(params)

  def gathered_bwd(_, grads):
    if param_shardings is None:
      return (grads,)
    return (jax.lax.with_sharding_constraint(grads, param_shardings),)

  gathered.defvjp(lambda params: (gathered(params), None), gathered_bwd)

  def gradients(params, batch_stats, teacher_variables, batch, key):
    """(loss, terms, new batch_stats, grads) of one (micro-)batch."""
    pixels = batch["image"]  # uint8 from the pipeline (or floats normalised as teacher_input[0])
    images = normalization.renormalize(pixels, teacher_input[0], teacher_input[0])
    teacher_out = None
    if teacher_call is not None:
      teacher_images = normalization.renormalize(pixels, *teacher_input)
      teacher_out = teacher.apply(
        whole(teacher_variables),
        teacher_images,
        method="encode" if teacher_call == "encode" else None,
      )
      teacher_out = jax.lax.stop_gradient(teacher_out)

    def loss_fn(params):
      out, updated = model.apply(
        {"params": gathered(params), "batch_stats": batch_stats},
        images,
        train=True,
        rngs={"dropout": key},
        mutable=["batch_stats"],
      )
      labels = batch["label"]
      total, terms = objective(
        method,
        settings,
        out,
        teacher_out,
        labels,
        class_weights,
        ce_logits=logits_for_ce(out["logits"], labels, model.kernels),
      )
      return total, (terms, updated.get("batch_stats", {}))

    (total, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return total, terms, batch_stats, grads

  def accumulated(state: TrainState, teacher_variables, batch, key):
    """``gradients`` over ``grad_accum_steps`` micro-batches in a scan: the mean loss,
    terms and gradients; BatchNorm running statistics updated once per micro-batch."""
    k = grad_accum_steps
    micro = jax.tree.map(lambda x: split_micro_batches(x, k, mesh), batch)

    def body(carry, xs):
      grads_sum, batch_stats = carry
      index, one = xs
      total, terms, batch_stats, grads = gradients(
        state.params, batch_stats, teacher_variables, one, jax.random.fold_in(key, index)
      )
      return (jax.tree.map(jnp.add, grads_sum, grads), batch_stats), (total, terms)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, batch_stats), (totals, terms) = jax.lax.scan(
      body, (zeros, state.batch_stats), (jnp.arange(k), micro)
    )
    mean = lambda x: jnp.mean(x, axis=0)  # noqa: E731
    return (
      mean(totals),
      jax.tree.map(mean, terms),
      batch_stats,
      jax.tree.map(lambda g: g / k, grads),
    )

  def step(state: TrainState, teacher_variables, batch):
    key = jax.random.fold_in(base_key, state.step)
    if grad_accum_steps == 1:
      total, terms, batch_stats, grads = gradients(
        state.params, state.batch_stats, teacher_variables, batch, key
      )
    else:
      total, terms, batch_stats, grads = accumulated(state, teacher_variables, batch, key)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
      "loss": total,
      **terms,
      "grad_norm": optax.global_norm(grads),
      "lr": schedule(state.step),
    }
    new_state = state.replace(
      step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    return new_state, metrics

  return step


def jit_train_step(step: Callable, mesh, state_sharding, teacher_sharding):
  """The step under jit: state donated, batch over every device, metrics replicated."""
  return jax.jit(
    sharding.traced_on(mesh, step),
    in_shardings=(state_sharding, teacher_sharding, sharding.batch_sharding(mesh)),
    out_shardings=(state_sharding, sharding.replicated(mesh)),
    donate_argnums=(0,),
  )
