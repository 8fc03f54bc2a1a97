"""The one training step every trainer compiles: RNG per step, gradients of the trainable
parameters, the optimizer update and the step's metrics, with a hook for what a trainer adds
around them (DINO's EMA teacher); and its jitted, sharded form."""

from typing import Any, Callable

import jax
import optax

from agriclip_jax import optim
from agriclip_jax import sharding
from agriclip_jax.trainers import state as state_lib


class StepHook:
  """What a trainer adds around the shared step; every method's default adds nothing.

  DINO's EMA teacher (`dino.Teacher`) is one: it computes its targets before the student's
  gradient, holds the head's last layer still early on, and follows the student afterwards.
  """

  def before(self, state, batch):
    """Computed outside the gradient and passed to the objective as its `context`."""
    del state, batch

  def edit_updates(self, updates, step):
    del step
    return updates

  def after(self, state, params, context) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state entries to replace, metrics), from the updated parameters."""
    del state, params, context
    return {}, {}


def train_step(objective: Callable, tx, labels: dict[str, str], lr_schedule: Callable,
               value_and_grad: Callable | None = None, hook: StepHook | None = None):
  """The one step function of every trainer, from `objective(params, batch, rng) -> (loss,
  metrics)`: RNG per step, gradients, the optimizer update, the step's metrics.

  Gradients are taken with respect to the trainable parameters only, so nothing is computed
  for frozen towers' backward passes and they pass through the step unchanged.
  `value_and_grad(trainable, frozen, batch, rng) -> ((loss, metrics), grads)` replaces
  autodiff of `objective` where a trainer computes them its own way (grad_cache).
  With a `hook`, the objective is `objective(params, batch, rng, context)`, `context` being
  what `hook.before` computed; see `StepHook`.
  """
  if hook is not None and value_and_grad is not None:
    raise ValueError("a step hook and a custom value_and_grad do not combine")
  with_context = hook is not None
  hook = hook or StepHook()

  def step(state, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    trainable, frozen = optim.split(state["params"], labels)
    context = hook.before(state, batch)
    if value_and_grad is None:
      args = (context,) if with_context else ()
      grad_fn = jax.value_and_grad(
          lambda t: objective(optim.merge(t, frozen), batch, rng, *args), has_aux=True)
      (loss, metrics), grads = grad_fn(trainable)
    else:
      (loss, metrics), grads = value_and_grad(trainable, frozen, batch, rng)
    updates, opt_state = tx.update(grads, state["opt_state"], trainable)
    updates = hook.edit_updates(updates, state["step"])
    params = optim.merge(optax.apply_updates(trainable, updates), frozen)
    entries, hook_metrics = hook.after(state, params, context)
    metrics = dict(metrics, **hook_metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                   lr=lr_schedule(state["step"]))
    return dict(state, step=state["step"] + 1, opt_state=opt_state, params=params,
                **entries), metrics

  return step


def jit_step(step: Callable, spec: state_lib.StateSpec, mesh: jax.sharding.Mesh):
  """The jitted, sharded step: state donated, batch split over the batch axes."""
  return jax.jit(step, in_shardings=(spec.shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(spec.shardings, sharding.replicated(mesh)), donate_argnums=0)
