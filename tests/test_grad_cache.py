"""The embedding-cache gradient (trainers/grad_cache.py) equals the full batch's gradient."""

import functools

import jax
import ml_collections
import numpy as np
import optax
import pytest

from agriclip_jax import config_lib
from agriclip_jax import optim
from agriclip_jax import sharding
from agriclip_jax.models import two_towers
from agriclip_jax.trainers import contrastive
from agriclip_jax.trainers import grad_cache
from agriclip_jax.trainers import state as state_lib
from agriclip_jax.trainers import step as step_lib

TOWER = dict(width=16, depth=1, mlp_dim=32, num_heads=2)


def _setup(rules, mesh_axes, loss="softmax", bias=None):
  model = two_towers.make(ml_collections.ConfigDict(dict(
      img=dict(TOWER, patch_size=4), txt=dict(TOWER), out_dim=8, logit_scale_init=10.0,
      logit_bias_init=bias)), vocab_size=30)
  mesh = sharding.make_mesh(mesh_axes, jax.devices()[:int(np.prod([s for _, s in mesh_axes]))])

  def model_init(rng):
    return model.init(rng, jax.numpy.zeros((1, 8, 8, 3)),
                      jax.numpy.zeros((1, 5), jax.numpy.int32))["params"]

  optim_config = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-2, schedule="constant", warmup_steps=0, end_lr_factor=0.0, b1=0.9,
      b2=0.999, eps=1e-8, weight_decay=1e-4, decay_regex=".*/kernel", clip_norm=0.0,
      clip_mode="global", rules=rules, weight_decay_end=None))
  _, labels, lr = optim.make(optim_config, jax.eval_shape(model_init, jax.random.key(0)), 10)
  # Plain SGD: the update is the gradient times 0.1, so equal updates mean equal gradients
  # (Adam's first step would turn gradients that are zero up to rounding into +-lr).
  tx = optax.sgd(0.1)
  spec = state_lib.make_spec(model_init, tx, labels, mesh, [(".*", "replicate")], seed=0)
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (32, 8, 8, 3)).astype(np.uint8),
           "text": rng.integers(1, 30, (32, 5)).astype(np.int32),
           "label": rng.integers(0, 4, 32).astype(np.int32)}
  return model, mesh, spec, tx, labels, lr, batch


def _normalize(images):
  return images.astype(np.float32) / 255.0


@pytest.mark.parametrize("case", ["clip", "sigmoid labels chunked, 4x2 devices", "lit"])
def test_micro_batched_update_equals_the_full_batch_update(case):
  rules = [(".*", {})]
  mesh_axes, loss, bias, targets, chunk = [("data", 8)], "softmax", None, "pairs", 0
  if case.startswith("sigmoid"):
    mesh_axes, loss, bias, targets, chunk = [("data", 4), ("fsdp", 2)], "sigmoid", -3.0, "labels", 8
  if case == "lit":  # A locked image tower but its head.
    rules = [("img/head/.*", {}), ("img/.*", None), (".*", {})]
  model, mesh, spec, tx, labels, lr, batch = _setup(rules, mesh_axes, loss, bias)
  loss_and_metrics = contrastive.make_loss(loss, targets, 0.9, chunk, mesh, 32)
  objective = contrastive.objective_of(model, _normalize, loss_and_metrics)
  embed = functools.partial(contrastive.embed, model, _normalize)
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))

  def one_step(micro_batches):
    value_and_grad = None
    if micro_batches > 1:
      value_and_grad = grad_cache.value_and_grad(embed, loss_and_metrics,
                                                 contrastive.norm_metrics, micro_batches)
    step = step_lib.jit_step(step_lib.train_step(objective, tx, labels, lr, value_and_grad),
                             spec, mesh)
    return step(spec.init(), batch)

  state, metrics = one_step(1)
  cached_state, cached_metrics = one_step(4)
  assert set(cached_metrics) == set(metrics)
  for key in metrics:
    np.testing.assert_allclose(cached_metrics[key], metrics[key], rtol=1e-5, atol=1e-6,
                               err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5),
               cached_state["params"], state["params"])
  assert float(metrics["grad_norm"]) > 0
  if case == "lit":
    jax.tree.map(np.testing.assert_array_equal, state["params"]["img"]["encoder"],
                 spec.init()["params"]["img"]["encoder"])


def test_plain_accumulation_would_differ():
  """What the embedding cache avoids: the mean of the micro-batches' own contrastive losses
  is a different objective, and its gradient is not the full batch's."""
  model, mesh, spec, tx, labels, lr, batch = _setup([(".*", {})], [("data", 1)])
  objective = contrastive.make_objective(model, "softmax", _normalize)
  params = spec.init()["params"]
  full = jax.jit(jax.grad(lambda p: objective(p, batch, jax.random.key(0))[0]))(params)
  halves = [jax.tree.map(lambda x, i=i: x[i::2], batch) for i in range(2)]
  accumulated = jax.jit(jax.grad(lambda p: sum(objective(p, h, jax.random.key(0))[0]
                                               for h in halves) / 2))(params)
  assert not np.allclose(full["logit_scale"], accumulated["logit_scale"], rtol=1e-3)


def test_micro_batches_must_divide_each_shard():
  with pytest.raises(config_lib.ConfigError, match="micro_batches=3 does not divide the 4"):
    grad_cache.check(3, 4)
  with pytest.raises(config_lib.ConfigError, match="must be >= 1"):
    grad_cache.check(0, 4)
