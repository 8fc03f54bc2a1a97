"""Chunked contrastive losses (losses.chunked) against the plain forms, on 1 and 8 devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agriclip_jax import config_lib
from agriclip_jax import sharding
from agriclip_jax.losses import chunked
from agriclip_jax.losses import contrastive

MESHES = {"1 device": [("data", 1)], "8 devices": [("data", 8)],
          "4x2 data/fsdp": [("data", 4), ("fsdp", 2)]}


def _mesh(axes):
  devices = jax.devices()[:int(np.prod([size for _, size in axes]))]
  return sharding.make_mesh(axes, devices)


def _batch(n=32, d=16, seed=0):
  rng = np.random.default_rng(seed)
  zimg = rng.normal(size=(n, d)).astype(np.float32)
  ztxt = (zimg + rng.normal(size=(n, d))).astype(np.float32)
  zimg /= np.linalg.norm(zimg, axis=1, keepdims=True)
  ztxt /= np.linalg.norm(ztxt, axis=1, keepdims=True)
  batch = {"label": rng.integers(0, 5, n).astype(np.int32),  # Many same-label pairs.
           "text": rng.integers(0, 3, (n, 4)).astype(np.int32)}  # Some identical texts.
  return zimg, ztxt, batch


def _plain(name, targets, weight, zimg, ztxt, scale, bias, batch):
  masks = contrastive.matches(batch)
  loss, metrics = contrastive.get(name)(zimg, ztxt, scale, bias,
                                        contrastive.positives(targets, masks), weight)
  return loss, dict(metrics, **contrastive.duplicate_fractions(masks))


def _chunked(name, targets, weight, mesh, chunk, zimg, ztxt, scale, bias, batch):
  return chunked.loss(name, zimg, ztxt, scale, bias, contrastive.keys(batch), mesh=mesh,
                      chunk=chunk, targets=targets, weight=weight)


def _value_and_grads(fn, mesh, zimg, ztxt, bias, batch):
  rows = sharding.batch_sharding(mesh)
  args = [jax.device_put(x, rows) for x in (zimg, ztxt)] + [jnp.float32(7.0), bias]
  batch = jax.device_put(batch, rows)
  argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
  grad_fn = jax.value_and_grad(lambda *a: fn(*a, batch), argnums, has_aux=True)
  return jax.jit(grad_fn)(*args)


@pytest.mark.parametrize("mesh_name", ["1 device", "4x2 data/fsdp"])
@pytest.mark.parametrize("targets,weight", [("pairs", 1.0), ("labels", 0.7), ("texts", 1.0)])
@pytest.mark.parametrize("name,bias", [("softmax", None), ("sigmoid", -3.0)])
def test_chunked_loss_gradients_and_metrics_equal_the_plain_form(mesh_name, targets, weight,
                                                                 name, bias):
  mesh = _mesh(MESHES[mesh_name])
  zimg, ztxt, batch = _batch()
  bias = None if bias is None else jnp.float32(bias)
  (loss, metrics), grads = _value_and_grads(
      functools.partial(_plain, name, targets, weight), mesh, zimg, ztxt, bias, batch)
  (c_loss, c_metrics), c_grads = _value_and_grads(
      functools.partial(_chunked, name, targets, weight, mesh, 4), mesh, zimg, ztxt, bias,
      batch)
  np.testing.assert_allclose(c_loss, loss, rtol=1e-5)
  assert set(c_metrics) == set(metrics)
  for key in metrics:
    np.testing.assert_allclose(c_metrics[key], metrics[key], rtol=1e-5, atol=1e-6, err_msg=key)
  for c_grad, grad in zip(c_grads, grads):
    np.testing.assert_allclose(c_grad, grad, rtol=1e-5, atol=1e-6)
  assert float(metrics["targets/same_label_fraction"]) > 0.1  # Label targets do matter here.


@pytest.mark.parametrize("chunk", [1, 8, 32, 1000])
def test_every_chunk_size_gives_the_same_loss(chunk):
  mesh = _mesh(MESHES["8 devices"])
  zimg, ztxt, batch = _batch(seed=1)
  (loss, _), grads = _value_and_grads(
      functools.partial(_plain, "softmax", "labels", 0.5), mesh, zimg, ztxt, None, batch)
  (c_loss, _), c_grads = _value_and_grads(
      functools.partial(_chunked, "softmax", "labels", 0.5, mesh, chunk), mesh, zimg, ztxt,
      None, batch)
  np.testing.assert_allclose(c_loss, loss, rtol=1e-5)
  np.testing.assert_allclose(c_grads[0], grads[0], rtol=1e-5, atol=1e-6)


def test_chunked_loss_holds_no_global_logit_matrix():
  """Per-device temporaries of the compiled loss + gradient: the plain form's grow with N^2,
  the chunked form's with N / devices * chunk (and N * d for the gathered embeddings)."""
  mesh = _mesh(MESHES["8 devices"])
  n, d = 4096, 16
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  emb = jax.ShapeDtypeStruct((n, d), jnp.float32, sharding=rows)
  batch = {"label": jax.ShapeDtypeStruct((n,), jnp.int32, sharding=rows)}

  def temp_bytes(fn):
    grad_fn = jax.grad(lambda a, b, s, batch: fn(a, b, s, None, batch)[0], (0, 1))
    compiled = jax.jit(grad_fn).lower(emb, emb, jnp.float32(7.0), batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  plain = temp_bytes(functools.partial(_plain, "softmax", "labels", 1.0))
  small = temp_bytes(functools.partial(_chunked, "softmax", "labels", 1.0, mesh, 256))
  assert plain >= n * n * 4 / 8  # At least this device's rows of the N x N logits.
  assert small * 10 < plain, (small, plain)


def test_chunk_that_does_not_divide_the_batch_is_one_line():
  mesh = _mesh(MESHES["8 devices"])
  zimg, ztxt, batch = _batch()
  with pytest.raises(config_lib.ConfigError, match="loss_chunk_size=5 does not divide"):
    _value_and_grads(functools.partial(_chunked, "softmax", "pairs", 1.0, mesh, 5), mesh,
                     zimg, ztxt, None, batch)


def test_label_targets_without_labels_are_one_line():
  mesh = _mesh(MESHES["1 device"])
  zimg, ztxt, batch = _batch()
  del batch["label"]
  with pytest.raises(config_lib.ConfigError, match="no label to match by"):
    _value_and_grads(functools.partial(_chunked, "softmax", "labels", 1.0, mesh, 4), mesh,
                     zimg, ztxt, None, batch)


def test_trainer_objective_with_chunks_equals_the_plain_one():
  """The contrastive trainer's objective (two towers, label targets, SigLIP bias) with
  `loss_chunk_size` gives the plain objective's loss, metrics and parameter gradients."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from agriclip_jax.models import two_towers  # pylint: disable=g-import-not-at-top
  from agriclip_jax.trainers import contrastive as trainer  # pylint: disable=g-import-not-at-top
  tower = dict(width=16, depth=1, mlp_dim=32, num_heads=2)
  model = two_towers.make(ml_collections.ConfigDict(dict(
      img=dict(tower, patch_size=4), txt=dict(tower), out_dim=8, logit_scale_init=10.0,
      logit_bias_init=-5.0)), vocab_size=30)
  rng = np.random.default_rng(0)
  mesh = _mesh(MESHES["4x2 data/fsdp"])
  batch = jax.device_put({"image": rng.uniform(size=(16, 8, 8, 3)).astype(np.float32),
                          "text": rng.integers(1, 30, (16, 5)).astype(np.int32),
                          "label": rng.integers(0, 3, 16).astype(np.int32)},
                         sharding.batch_sharding(mesh))
  params = model.init(jax.random.key(0), batch["image"][:1], batch["text"][:1])["params"]

  def run(chunk_size):
    objective = trainer.make_objective(model, "sigmoid", lambda x: x, "labels", 0.9,
                                       chunk_size, mesh, batch_size=16)
    grad_fn = jax.value_and_grad(objective, has_aux=True)
    return jax.jit(grad_fn)(params, batch, jax.random.key(1))

  (loss, metrics), grads = run(0)
  (c_loss, c_metrics), c_grads = run(4)
  np.testing.assert_allclose(c_loss, loss, rtol=1e-5)
  for key in metrics:
    np.testing.assert_allclose(c_metrics[key], metrics[key], rtol=1e-5, atol=1e-6, err_msg=key)
  # To 1e-5 of each gradient's scale (at least 1): float32 sums of terms up to ~100 cancel
  # in some, others are ~1e-8 and all rounding.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=0, atol=1e-5 * max(np.abs(b).max(), 1.0)), c_grads, grads)
  with pytest.raises(config_lib.ConfigError, match="does not divide the global batch 16"):
    trainer.make_objective(model, "sigmoid", lambda x: x, chunk_size=3, mesh=mesh,
                           batch_size=16)


@pytest.mark.parametrize("chunk", [0, 8])
def test_logit_precision_reaches_the_similarity_matmul(chunk):
  from agriclip_jax.trainers import contrastive as trainer  # pylint: disable=g-import-not-at-top
  mesh = _mesh(MESHES["8 devices"])
  zimg, ztxt, batch = _batch()
  hlo = {}
  for name in ("highest", "default"):
    loss = trainer.make_loss("softmax", "pairs", 1.0, chunk, mesh, 32, name)
    hlo[name] = jax.jit(lambda a, b, loss=loss: loss(a, b, {"logit_scale": 7.0}, batch)[0]
                        ).lower(zimg, ztxt).as_text()
  assert "HIGHEST" in hlo["highest"] and "HIGHEST" not in hlo["default"]
  with pytest.raises(config_lib.ConfigError, match="logit_precision must be one of"):
    trainer.make_loss("softmax", logit_precision="tf32")
