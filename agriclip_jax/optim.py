"""Optimizers from `config.optim`, with per-parameter rules and frozen parameters.

`optim.rules` is a list of `(regex, rule)` pairs matched in order against each parameter path
(`img/encoder/block00/mlp/fc1/kernel`, ...; `re.fullmatch`). A rule is `None` (freeze: no
gradient is computed, no optimizer state is kept) or a dict with optional `lr_mult` and
`wd_mult`. A parameter no rule covers is a config error. LiT is `[("img/.*", None), (".*", {})]`.

Weight decay applies only to parameters whose path matches `optim.decay_regex` (kernels by
default), scaled by the rule's `wd_mult`; it is decoupled (AdamW-style, scaled by the learning
rate) and follows a cosine from `weight_decay` to `weight_decay_end` when that is set.
Gradients are clipped to `clip_norm` by their global norm, or parameter by parameter with
`clip_mode="per_param"` (DINO's recipe).
"""

import json
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from agriclip_jax import config_lib
from agriclip_jax.pytree import flatten, path_str, unflatten

FROZEN = "frozen"
_RULE_KEYS = {"lr_mult", "wd_mult"}


class OptimConfigError(config_lib.ConfigError):
  """`config.optim` is inconsistent with the model's parameters."""


def param_labels(params, rules) -> dict[str, str]:
  """path -> FROZEN, or the first matching rule as JSON (equal rules share one group)."""
  compiled = []
  for i, (pattern, rule) in enumerate(rules):
    if rule is not None:
      unknown = set(rule) - _RULE_KEYS
      if unknown:
        raise OptimConfigError(f"optim.rules[{i}] ({pattern!r}) has unknown keys "
                               f"{sorted(unknown)}; allowed: {sorted(_RULE_KEYS)}")
    label = FROZEN if rule is None else json.dumps(dict(rule), sort_keys=True)
    compiled.append((config_lib.compile_regex(pattern, f"optim.rules[{i}]"), label))
  labels = {}
  for path in flatten(params):
    for regex, label in compiled:
      if regex.fullmatch(path):
        labels[path] = label
        break
    else:
      raise OptimConfigError(f"parameter {path} is covered by no optim.rules entry; add a "
                             "rule for it (e.g. ('.*', {}) last)")
  return labels


def split(params, labels: dict[str, str]):
  """(trainable, frozen) sub-trees of `params`."""
  flat = flatten(params)
  trainable = {k: v for k, v in flat.items() if labels[k] != FROZEN}
  frozen = {k: v for k, v in flat.items() if labels[k] == FROZEN}
  return unflatten(trainable), unflatten(frozen)


def merge(trainable, frozen):
  return unflatten({**flatten(trainable), **flatten(frozen)})


def cosine(start: float, end: float, total_steps: int) -> Callable[[Any], Any]:
  """step -> `start` at 0, `end` from `total_steps` on, half a cosine in between."""
  def value(step):
    progress = jnp.clip(step / max(total_steps, 1), 0.0, 1.0)
    return end + (start - end) * 0.5 * (1 + jnp.cos(np.pi * progress))
  return value


def warmup_then_constant(start: float, end: float, warmup_steps: int):
  """step -> linear from `start` to `end` over `warmup_steps`, then `end`."""
  def value(step):
    if not warmup_steps:
      return jnp.asarray(end, jnp.float32)
    return start + (end - start) * jnp.clip(step / warmup_steps, 0.0, 1.0)
  return value


def scheduled_decay(weight_decay: Callable[[Any], Any], mask) -> optax.GradientTransformation:
  """Adds `weight_decay(step) * param` to the update where `mask(params)` is True.

  Optax's `add_decayed_weights` with its `mask=` would wrap the schedule's step count in a
  `MaskedState`, moving it in the optimizer state and so in every checkpoint written before;
  masking the parameters it reads instead (zero adds nothing) keeps the stored layout.
  """
  decay = optax.add_decayed_weights(weight_decay)

  def update(updates, state, params):
    kept = jax.tree.map(lambda p, m: p if m else jnp.zeros_like(p), params, mask(params))
    return decay.update(updates, state, kept)

  return optax.GradientTransformation(decay.init, update)


def clip_each(max_norm: float) -> optax.GradientTransformation:
  """Scales each parameter's gradient down to norm `max_norm` if it is larger."""
  def clip(updates, state, params=None):
    del params
    return jax.tree.map(
        lambda g: g * jnp.minimum(1.0, max_norm / (jnp.linalg.norm(g) + 1e-6)), updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), clip)


def schedule(config, total_steps: int) -> Callable[[Any], Any]:
  """Learning-rate schedule: linear warm-up, then `config.schedule`."""
  lr, warmup = config.lr, config.warmup_steps
  end = lr * config.get("end_lr_factor", 0.0)
  decay_steps = max(total_steps - warmup, 1)
  name = config.schedule
  if name == "cosine":
    after = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
  elif name == "linear":
    after = optax.linear_schedule(lr, end, decay_steps)
  elif name == "constant":
    after = optax.constant_schedule(lr)
  elif name == "rsqrt":
    after = lambda step: lr * jax.lax.rsqrt(1.0 + step / max(warmup, 1))
  else:
    raise OptimConfigError(f"unknown optim.schedule {name!r}; expected cosine, linear, "
                           "constant or rsqrt")
  if not warmup:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def _group(config, lr_schedule, rule: dict, decay_regex: re.Pattern,
           total_steps: int) -> optax.GradientTransformation:
  lr_mult, wd_mult = rule.get("lr_mult", 1.0), rule.get("wd_mult", 1.0)
  scaled_lr = lambda step: lr_schedule(step) * lr_mult
  decay_mask = lambda tree: jax.tree_util.tree_map_with_path(
      lambda path, _: bool(decay_regex.fullmatch(path_str(path))), tree)
  end = config.get("weight_decay_end")
  decay = scheduled_decay(cosine(config.weight_decay * wd_mult,
                                 (config.weight_decay if end is None else end) * wd_mult,
                                 total_steps), decay_mask)
  if config.name == "adamw":  # optax.adamw, with a schedulable decay.
    moments = optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps)
  elif config.name == "adafactor":  # Factored second moments, update clipping.
    moments = optax.chain(optax.scale_by_factored_rms(), optax.clip_by_block_rms(1.0))
  else:
    raise OptimConfigError(f"unknown optim.name {config.name!r}; expected adamw or adafactor")
  # Decoupled decay, scaled by the learning rate: weight_decay means the same for both.
  return optax.chain(moments, decay, optax.scale_by_learning_rate(scaled_lr))


def make(config, params, total_steps: int):
  """(optax transformation over the trainable sub-tree, labels, lr schedule)."""
  labels = param_labels(params, config.rules)
  trainable, _ = split(params, labels)
  if not jax.tree.leaves(trainable):
    raise OptimConfigError("optim.rules freeze every parameter; nothing would train")
  lr_schedule = schedule(config, total_steps)
  decay_regex = config_lib.compile_regex(config.decay_regex, "optim.decay_regex")
  groups = {label: _group(config, lr_schedule, json.loads(label), decay_regex, total_steps)
            for label in sorted(set(labels.values()) - {FROZEN})}
  if len(groups) == 1:
    tx = next(iter(groups.values()))
  else:
    trainable_labels = unflatten({k: v for k, v in labels.items() if v != FROZEN})
    tx = optax.multi_transform(groups, trainable_labels)
  if config.get("clip_norm"):
    mode = config.get("clip_mode", "global")
    if mode not in ("global", "per_param"):
      raise OptimConfigError(f"optim.clip_mode {mode!r}: expected global or per_param")
    clip = (optax.clip_by_global_norm(config.clip_norm) if mode == "global"
            else clip_each(config.clip_norm))
    tx = optax.chain(clip, tx)
  return tx, labels, lr_schedule
