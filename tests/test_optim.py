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
from agriclip_jax.trainers import step as step_lib

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
  step = jax.jit(step_lib.train_step(_objective, tx, labels, lr))
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
  step = jax.jit(step_lib.train_step(_objective, tx, labels, lr))
  batch = jnp.asarray(np.random.default_rng(1).normal(size=(4, 4)), jnp.float32)
  losses = []
  for _ in range(20):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.5 * losses[0]
  np.testing.assert_allclose(losses[0], first["loss"], rtol=1e-6)  # Same objective.


def test_adafactor_keeps_row_and_column_statistics_of_large_matrices_only():
  """A 256x384 kernel's second moments are a 256-row and a 384-column vector (not 256x384
  numbers, as Adam keeps twice), and they are those of the squared gradient."""
  params = {"w": {"kernel": jnp.zeros((256, 384))}, "b": {"bias": jnp.zeros((384,))}}
  tx, _, _ = optim.make(_config(name="adafactor", rules=[(".*", {})], weight_decay=0.0),
                        params, total_steps=10)
  grads = {"w": {"kernel": jnp.asarray(np.random.default_rng(2).normal(size=(256, 384)),
                                       jnp.float32)},
           "b": {"bias": jnp.ones((384,))}}
  _, opt_state = tx.update(grads, tx.init(params), params)
  [factored] = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "v_row"))
                if hasattr(s, "v_row")]
  shapes = {k: [x.shape for x in jax.tree.leaves(getattr(factored, k))]
            for k in ("v_row", "v_col", "v")}
  assert sorted(shapes["v_row"]) == [(1,), (256,)] and sorted(shapes["v_col"]) == [(1,), (384,)]
  assert sorted(shapes["v"]) == [(1,), (384,)]  # A full moment only for the vector.
  state_size = sum(x.size for x in jax.tree.leaves(opt_state))
  assert state_size < 2000  # Adam: 2 * (256 * 384 + 384) = 197,376 numbers.
  g2 = np.asarray(grads["w"]["kernel"], np.float64) ** 2
  row = [x for x in jax.tree.leaves(factored.v_row) if x.shape == (256,)][0]
  col = [x for x in jax.tree.leaves(factored.v_col) if x.shape == (384,)][0]
  # After one step the running means hold (1 - decay) times the gradient's row/column means
  # (plus a tiny epsilon); their ratio is the same at every row and column.
  np.testing.assert_allclose(np.asarray(row) / np.asarray(row)[0],
                             g2.mean(1) / g2.mean(1)[0], rtol=1e-3)
  np.testing.assert_allclose(np.asarray(col) / np.asarray(col)[0],
                             g2.mean(0) / g2.mean(0)[0], rtol=1e-3)


def test_lit_skips_the_locked_towers_backward_pass():
  """Freezing must remove the image trunk's backward pass from the compiled step, not compute
  it and drop the result: the step's FLOPs fall by the trunk's weight gradient, a matmul as
  large as its forward one (its input is data, so no input gradient is needed either way)."""
  rng = np.random.default_rng(0)
  f = lambda *shape: jnp.asarray(rng.normal(size=shape) * 0.05, jnp.float32)
  params = {"img": {"trunk": {"kernel": f(512, 512)}, "head": {"kernel": f(512, 16)}},
            "txt": {"head": {"kernel": f(32, 16)}}}
  batch = {"image": f(256, 512), "text": f(256, 32)}

  def objective(p, b, rng):
    del rng
    img = jnp.tanh(b["image"] @ p["img"]["trunk"]["kernel"]) @ p["img"]["head"]["kernel"]
    return jnp.mean((img - b["text"] @ p["txt"]["head"]["kernel"]) ** 2), {}

  def step_flops(rules, mask_instead=False):
    tx, labels, lr = optim.make(_config(rules=[(".*", {})] if mask_instead else rules), params,
                                total_steps=10)
    step = step_lib.train_step(objective, tx, labels, lr)
    if mask_instead:  # Gradients for everything, the trunk's update zeroed afterwards.
      masked = optax.chain(optax.masked(optax.set_to_zero(), lambda t: {
          "img": {"trunk": {"kernel": True}, "head": {"kernel": False}},
          "txt": {"head": {"kernel": False}}}), tx)
      step = step_lib.train_step(objective, masked, labels, lr)
      tx = masked
    trainable, _ = optim.split(params, labels)
    state = {"step": jnp.int32(0), "params": params, "opt_state": tx.init(trainable),
             "rng": jax.random.key_data(jax.random.key(0))}
    return jax.jit(step).lower(state, batch).compile().cost_analysis()["flops"]

  trunk_forward = 2 * 256 * 512 * 512
  trained, locked = step_flops([(".*", {})]), step_flops(LIT_RULES_TRUNK)
  masked = step_flops(None, mask_instead=True)
  assert trained - locked > 0.95 * trunk_forward  # The trunk's dW is not computed...
  assert masked - locked > 0.95 * trunk_forward  # ...which masking its update would not save.


LIT_RULES_TRUNK = [("img/head/.*", {}), ("img/.*", None), (".*", {})]