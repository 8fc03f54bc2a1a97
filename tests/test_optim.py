"""Optimizer rules: freezing, coverage errors, decay masks and schedules."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from agriclip_jax import optim
from agriclip_jax.pytree import flatten, path_str
from agriclip_jax.trainers import common

LIT_RULES = [("img/head/.*", {}), ("img/.*", None), (".*", {})]


def _params():
  rng = np.random.default_rng(0)
  f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return {"img": {"embed": {"kernel": f(4, 3), "bias": f(3)}, "head": {"kernel": f(3, 2)}},
          "txt": {"embed": {"embedding": f(5, 3)}, "head": {"kernel": f(3, 2), "bias": f(2)}},
          "logit_scale": jnp.float32(2.0)}


def _config(**kw):
  config = common.base_config().optim
  config.update(dict(dict(lr=0.1, warmup_steps=0, weight_decay=0.5), **kw))
  return config


def _objective(params, batch, rng):
  del rng
  img = batch @ params["img"]["embed"]["kernel"] + params["img"]["embed"]["bias"]
  img = img @ params["img"]["head"]["kernel"]
  txt = params["txt"]["embed"]["embedding"][:4] @ params["txt"]["head"]["kernel"]
  loss = jnp.mean((img - txt - params["txt"]["head"]["bias"]) ** 2) * params["logit_scale"]
  return loss, {}


def _run(rules, steps=3):
  params = _params()
  tx, labels, lr = optim.make(_config(rules=rules), params, total_steps=10)
  trainable, _ = optim.split(params, labels)
  state = {"step": jnp.int32(0), "params": params, "opt_state": tx.init(trainable),
           "rng": jax.random.key_data(jax.random.key(0))}
  step = jax.jit(common.train_step(_objective, tx, labels, lr))
  batch = jnp.asarray(np.random.default_rng(1).normal(size=(4, 4)), jnp.float32)
  for _ in range(steps):
    state, metrics = step(state, batch)
  return params, state, labels, metrics


def test_lit_freezes_image_trunk_bitwise_and_keeps_no_state_for_it():
  before, state, labels, _ = _run(LIT_RULES)
  after = flatten(state["params"])
  for path, value in flatten(before).items():
    if labels[path] == optim.FROZEN:
      assert path.startswith("img/embed/")
      assert np.asarray(after[path]).tobytes() == np.asarray(value).tobytes(), path
    else:
      assert not np.allclose(after[path], value), f"{path} did not train"
  opt_paths = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(state["opt_state"])]
  assert not any("img/embed" in p for p in opt_paths), opt_paths
  assert any(p.endswith("mu/img/head/kernel") for p in opt_paths)
  assert any(p.endswith("nu/txt/head/bias") for p in opt_paths)


def test_first_matching_rule_wins_and_lr_mult_scales_updates():
  rules = [("txt/head/kernel", {"lr_mult": 0.0}), (".*", {})]
  before, state, _, _ = _run(rules)
  after = flatten(state["params"])
  # lr_mult 0 leaves only weight decay, which is also scaled by the (zero) learning rate.
  np.testing.assert_array_equal(after["txt/head/kernel"], flatten(before)["txt/head/kernel"])
  assert not np.allclose(after["txt/head/bias"], flatten(before)["txt/head/bias"])


def test_uncovered_parameter_is_named():
  with pytest.raises(optim.OptimConfigError, match="parameter txt/embed/embedding is covered"):
    optim.make(_config(rules=[("img/.*", {}), ("logit_scale", {}), ("txt/head/.*", {})]),
               _params(), total_steps=10)


def test_unknown_rule_key_and_all_frozen_are_errors():
  with pytest.raises(optim.OptimConfigError, match="unknown keys"):
    optim.make(_config(rules=[(".*", {"lr_multiplier": 2.0})]), _params(), total_steps=10)
  with pytest.raises(optim.OptimConfigError, match="freeze every parameter"):
    optim.make(_config(rules=[(".*", None)]), _params(), total_steps=10)


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_weight_decay_only_where_decay_regex_matches(name):
  params = _params()
  tx, labels, _ = optim.make(_config(name=name, rules=[(".*", {})], clip_norm=0.0), params, 10)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  for path, update in flatten(updates).items():
    value = flatten(params)[path]
    if path.endswith("kernel"):  # decoupled decay: -lr * wd * p
      np.testing.assert_allclose(update, -0.1 * 0.5 * value, rtol=1e-6)
    else:
      np.testing.assert_array_equal(update, np.zeros_like(value))
  del labels


@pytest.mark.parametrize("name", ["cosine", "linear", "constant", "rsqrt"])
def test_schedules_warm_up_then_follow_their_shape(name):
  config = ml_collections.ConfigDict(dict(lr=1.0, warmup_steps=10, schedule=name,
                                          end_lr_factor=0.1))
  fn = optim.schedule(config, total_steps=110)
  np.testing.assert_allclose(fn(0), 0.0, atol=1e-7)
  np.testing.assert_allclose(fn(5), 0.5, rtol=1e-6)
  np.testing.assert_allclose(fn(10), 1.0, rtol=1e-6)
  expected_end = {"cosine": 0.1, "linear": 0.1, "constant": 1.0,
                  "rsqrt": 1 / np.sqrt(1 + 100 / 10)}[name]
  np.testing.assert_allclose(fn(110), expected_end, rtol=1e-5)
  if name == "cosine":  # halfway through the decay: midway between peak and end
    np.testing.assert_allclose(fn(60), 0.55, rtol=1e-5)


def test_clipping_and_grad_norm_use_the_trainable_gradients_only():
  params = _params()
  labels = optim.param_labels(params, LIT_RULES)
  trainable, frozen = optim.split(params, labels)
  batch = jnp.asarray(np.random.default_rng(1).normal(size=(4, 4)), jnp.float32)
  grads = jax.grad(lambda t: _objective(optim.merge(t, frozen), batch, None)[0])(trainable)
  norm = float(optax.tree.norm(grads))
  _, _, _, metrics = _run(LIT_RULES, steps=1)
  np.testing.assert_allclose(metrics["grad_norm"], norm, rtol=1e-5)
  # With a huge eps, Adam's first update is -lr * g / eps: the clipped gradient, scaled.
  config = _config(rules=LIT_RULES, clip_norm=0.5 * norm, eps=1e6, weight_decay=0.0)
  tx, _, _ = optim.make(config, params, total_steps=10)
  updates, _ = tx.update(grads, tx.init(trainable), trainable)
  np.testing.assert_allclose(float(optax.tree.norm(updates)) * 1e6 / 0.1, 0.5 * norm,
                             rtol=1e-3)


def test_adafactor_trains_and_keeps_factored_state():
  rules = [(".*", {})]
  _, state, _, first = _run(rules, steps=1)
  params = _params()
  tx, labels, lr = optim.make(_config(name="adafactor", rules=rules), params, total_steps=10)
  state = {"step": jnp.int32(0), "params": params, "opt_state": tx.init(params),
           "rng": jax.random.key_data(jax.random.key(0))}
  step = jax.jit(common.train_step(_objective, tx, labels, lr))
  batch = jnp.asarray(np.random.default_rng(1).normal(size=(4, 4)), jnp.float32)
  losses = []
  for _ in range(20):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.5 * losses[0]
  np.testing.assert_allclose(losses[0], first["loss"], rtol=1e-6)  # Same objective.
