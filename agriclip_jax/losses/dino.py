"""The DINO self-distillation loss, its centering, and its schedules.

Like the contrastive losses these are written on global arrays: the center's batch mean is a
mean over the global batch, whatever devices or processes hold it.
"""

import jax
import jax.numpy as jnp


def loss(student: list[jax.Array], teacher: list[jax.Array], center: jax.Array,
         student_temp: float, teacher_temp) -> jax.Array:
  """Cross-entropy of each student crop against each *other* teacher (global) crop.

  student: per crop [batch, out_dim] logits (the global crops first, in the teacher's order);
  teacher: per global crop [batch, out_dim] logits. Averaged over batch and crop pairs.
  """
  targets = [jax.lax.stop_gradient(jax.nn.softmax((t - center) / teacher_temp, axis=-1))
             for t in teacher]
  log_probs = [jax.nn.log_softmax(s / student_temp, axis=-1) for s in student]
  total, pairs = 0.0, 0
  for i, target in enumerate(targets):
    for v, log_prob in enumerate(log_probs):
      if v == i:
        continue  # A crop is not its own target.
      total = total + jnp.mean(jnp.sum(-target * log_prob, axis=-1))
      pairs += 1
  return total / pairs


def update_center(center: jax.Array, teacher: list[jax.Array], momentum: float) -> jax.Array:
  """EMA of the teacher outputs' batch mean (over all global crops of the global batch)."""
  batch_mean = jnp.mean(jnp.concatenate(teacher, axis=0), axis=0)
  return center * momentum + batch_mean * (1 - momentum)


def ema(teacher, student, momentum):
  """teacher <- momentum * teacher + (1 - momentum) * student, leaf by leaf."""
  return jax.tree.map(lambda t, s: t * momentum + s * (1 - momentum), teacher, student)
