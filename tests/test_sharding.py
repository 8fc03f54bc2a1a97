"""Sharded training on 8 simulated devices equals training on 1 device."""

import functools

import jax
import ml_collections
import numpy as np
import pytest

from agriclip_jax import optim
from agriclip_jax import sharding
from agriclip_jax.input import pipeline
from agriclip_jax.input import preprocess
from agriclip_jax.models import two_towers
from agriclip_jax.pytree import flatten
from agriclip_jax.trainers import common
from agriclip_jax.trainers import contrastive
from agriclip_jax.trainers import state as state_lib
from agriclip_jax.trainers import step as step_lib

BATCH, IMAGE, TEXT_LEN, VOCAB = 16, 16, 8, 50


def _model_config():
  tower = dict(width=32, depth=1, mlp_dim=64, num_heads=2)
  return ml_collections.ConfigDict(dict(
      img=dict(tower, patch_size=4, pool_type="map"), txt=dict(tower), out_dim=16,
      logit_scale_init=10.0, logit_bias_init=None))


def _optim_config(rules):
  config = common.base_config().optim
  config.update(lr=1e-2, warmup_steps=1, rules=rules, weight_decay=0.1)
  return config


def _batches(n):
  rng = np.random.default_rng(0)
  return [{"image": rng.integers(0, 256, (BATCH, IMAGE, IMAGE, 3), dtype=np.uint8),
           "text": rng.integers(1, VOCAB, (BATCH, TEXT_LEN)).astype(np.int32)}
          for _ in range(n)]


@functools.lru_cache(maxsize=None)
def train(mesh_axes, num_devices, loss="softmax", rules=((".*", {}),)):
  """Losses of 3 steps and final params, on a mesh over the first `num_devices`."""
  mesh = sharding.make_mesh(mesh_axes, jax.devices()[:num_devices])
  config = _model_config()
  if loss == "sigmoid":
    config.logit_bias_init = -5.0
  model = two_towers.make(config, vocab_size=VOCAB)
  model_init = lambda rng: model.init(
      rng, jax.numpy.zeros((1, IMAGE, IMAGE, 3)),
      jax.numpy.zeros((1, TEXT_LEN), jax.numpy.int32))["params"]
  shape = jax.eval_shape(model_init, jax.random.key(0))
  tx, labels, lr = optim.make(_optim_config(list(rules)), shape, total_steps=3)
  spec = state_lib.make_spec(model_init, tx, labels, mesh, [(".*", "fsdp")], seed=0,
                             fsdp_min_size=64)
  objective = contrastive.make_objective(model, loss, preprocess.normalize)
  batch_sharding = sharding.batch_sharding(mesh)
  step = step_lib.jit_step(step_lib.train_step(objective, tx, labels, lr), spec, mesh)
  state, losses = spec.init(), []
  for batch in _batches(3):
    state, metrics = step(state, sharding.global_batch(batch, batch_sharding))
    losses.append(float(metrics["loss"]))
  return losses, jax.tree.map(np.asarray, state), spec


@pytest.mark.parametrize("mesh_axes,loss", [
    ((("data", 8), ("fsdp", 1)), "softmax"),
    ((("data", 2), ("fsdp", 4)), "softmax"),
    ((("data", 1), ("fsdp", 8)), "sigmoid"),
])
def test_eight_devices_match_one(mesh_axes, loss):
  assert jax.device_count() == 8
  ref_losses, ref_state, _ = train((("data", 1),), 1, loss)
  losses, state, spec = train(mesh_axes, 8, loss)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  for path, value in flatten(state["params"]).items():
    if path.endswith("attn/key/bias"):
      # Softmax ignores a constant added to every key score, so this bias's gradient is
      # zero up to rounding, and Adam turns rounding noise into full-size steps.
      continue
    np.testing.assert_allclose(value, flatten(ref_state["params"])[path], rtol=1e-4,
                               atol=1e-5, err_msg=path)
  if dict(mesh_axes)["fsdp"] > 1:  # The big kernels really are split over fsdp.
    kernel = spec.shardings["params"]["txt"]["encoder"]["block00"]["mlp"]["fc1"]["kernel"]
    assert "fsdp" in kernel.spec


def test_fsdp_rule_splits_largest_divisible_dimension():
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
  shapes = {"big": jax.ShapeDtypeStruct((6, 64), np.float32),
            "odd": jax.ShapeDtypeStruct((7, 9), np.float32),
            "small": jax.ShapeDtypeStruct((4,), np.float32),
            "fixed": jax.ShapeDtypeStruct((8, 8), np.float32)}
  rules = [("fixed", ("fsdp", None)), (".*", "fsdp")]
  out = sharding.param_shardings(mesh, shapes, rules, min_size=32)
  assert out["big"].spec == jax.sharding.PartitionSpec(None, "fsdp")
  assert out["odd"].spec == jax.sharding.PartitionSpec()  # Nothing divisible by 4.
  assert out["small"].spec == jax.sharding.PartitionSpec()  # Below min_size.
  assert out["fixed"].spec == jax.sharding.PartitionSpec("fsdp", None)


def test_optimizer_state_follows_parameter_sharding():
  _, _, spec = train((("data", 2), ("fsdp", 4)), 8)
  params = flatten(spec.shardings["params"])
  for path, leaf_sharding in jax.tree_util.tree_leaves_with_path(spec.shardings["opt_state"]):
    name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in path)
    for param_path, param_sharding in params.items():
      if name.endswith("mu/" + param_path):
        assert leaf_sharding.spec == param_sharding.spec, name


def test_uncovered_parameter_and_bad_mesh_are_config_errors():
  mesh = sharding.make_mesh([("data", -1)])
  with pytest.raises(ValueError, match="a/b is covered by no sharding rule"):
    sharding.param_shardings(mesh, {"a": {"b": jax.ShapeDtypeStruct((2,), np.float32)}},
                             [("c.*", "replicate")])
  with pytest.raises(ValueError, match="needs 6 devices; there are 8"):
    sharding.make_mesh([("data", 3), ("fsdp", 2)])
  with pytest.raises(ValueError, match="not divisible"):
    sharding.batch_size_per_shard(mesh, 12)
  with pytest.raises(ValueError, match=r"config.mesh=\[\('data',\)\]: expected a list of pairs"):
    sharding.make_mesh([("data",)])
  with pytest.raises(ValueError, match="config.sharding_rules=.*expected a list of pairs"):
    sharding.param_shardings(mesh, {"a": jax.ShapeDtypeStruct((2,), np.float32)}, [".*"])


def test_single_process_holds_all_rows():
  mesh = sharding.make_mesh([("data", 4), ("fsdp", 2)])
  rows = pipeline.rows_of_process(sharding.batch_sharding(mesh), 32)
  assert (rows.start, rows.stop, rows.global_size) == (0, 32, 32)
