"""Towers: a numpy reference for the encoder block, pooling, masking and config errors."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import special

from agriclip_jax import config_lib
from agriclip_jax.models import layers
from agriclip_jax.models import text
from agriclip_jax.models import two_towers
from agriclip_jax.models import vit


def _layer_norm(x, p, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def numpy_block(x, p, num_heads, mask):
  """Pre-LN transformer block written out in numpy (float64)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  b, t, d = x.shape
  hd = d // num_heads
  y = _layer_norm(x, p["norm1"])
  a = p["attn"]
  proj = lambda name: np.einsum("btd,dhk->bthk", y, a[name]["kernel"]) + a[name]["bias"]
  q, k, v = proj("query"), proj("key"), proj("value")
  scores = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(hd)
  scores = np.where(mask, scores, -np.inf)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = np.einsum("bhqs,bshk->bqhk", weights, v)
  x = x + np.einsum("bqhk,hkd->bqd", out, a["out"]["kernel"]) + a["out"]["bias"]
  y = _layer_norm(x, p["norm2"])
  m = p["mlp"]
  hidden = y @ m["fc1"]["kernel"] + m["fc1"]["bias"]
  hidden = 0.5 * hidden * (1 + special.erf(hidden / np.sqrt(2)))  # exact GELU
  return x + hidden @ m["fc2"]["kernel"] + m["fc2"]["bias"]


@pytest.mark.parametrize("causal", [False, True])
def test_encoder_block_matches_numpy(causal):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 12)).astype(np.float32)
  mask = np.tril(np.ones((5, 5), bool))[None, None] if causal else None
  block = layers.EncoderBlock(num_heads=3, mlp_dim=20)
  params = block.init(jax.random.key(1), x, mask)["params"]
  params = jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape).astype(np.float32),
                        params)  # Non-trivial norms and biases.
  got = block.apply({"params": params}, x, mask)
  ref_mask = np.ones((1, 1, 5, 5), bool) if mask is None else mask
  want = numpy_block(x.astype(np.float64), params, 3, ref_mask)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_vit_variants_and_errors():
  assert vit.parse_variant("B/16") == dict(width=768, depth=12, mlp_dim=3072, num_heads=12,
                                           patch_size=16)
  assert vit.parse_variant("Ti/16")["width"] == 192
  for bad in ("B", "X/16", "B/x"):
    with pytest.raises(config_lib.ConfigError, match="unknown ViT variant"):
      vit.parse_variant(bad)


@pytest.mark.parametrize("pool_type", ["tok", "gap", "map"])
def test_vit_pools_and_resizes_position_embedding(pool_type):
  model = vit.Model(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4,
                    pool_type=pool_type, num_classes=7)
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  assert params["pos_embedding"].shape == (1, 4, 4, 16)
  out, extras = model.apply({"params": params}, jnp.ones((3, 16, 16, 3)))
  assert out.shape == (3, 7) and extras["pre_logits"].shape == (3, 16)
  tokens = 16 + (pool_type == "tok")
  assert extras["encoded"].shape == (3, tokens, 16)
  # Another resolution (e.g. DINO's local crops) reuses the same parameters.
  out, extras = model.apply({"params": params}, jnp.ones((2, 8, 8, 3)))
  assert out.shape == (2, 7) and extras["encoded"].shape[1] == 4 + (pool_type == "tok")


def _text_model(causal, pool_type="eot"):
  model = text.Model(vocab_size=20, width=16, depth=2, mlp_dim=32, num_heads=2,
                     causal=causal, pool_type=pool_type)
  params = model.init(jax.random.key(0), jnp.zeros((1, 6), jnp.int32))["params"]
  return model, params


def test_eot_index_is_last_non_padding_token():
  tokens = jnp.array([[2, 5, 1, 0, 0, 0], [2, 0, 7, 9, 1, 0], [2, 3, 4, 5, 6, 1]])
  np.testing.assert_array_equal(text.eot_index(tokens), [2, 4, 5])


def test_causal_text_positions_do_not_see_later_tokens():
  model, params = _text_model(causal=True)
  a = jnp.array([[2, 5, 6, 1, 0, 0]])
  b = jnp.array([[2, 5, 6, 8, 9, 1]])  # Same first three tokens, different later ones.
  _, extras_a = model.apply({"params": params}, a)
  _, extras_b = model.apply({"params": params}, b)
  np.testing.assert_allclose(extras_a["encoded"][:, :3], extras_b["encoded"][:, :3],
                             rtol=1e-5, atol=1e-6)
  assert not np.allclose(extras_a["encoded"][:, 3], extras_b["encoded"][:, 3])
  # Pooling takes each row's end-of-text position.
  np.testing.assert_allclose(model.apply({"params": params}, a)[0],
                             extras_a["encoded"][:, 3], rtol=1e-6)


def test_bidirectional_text_ignores_padding_length():
  model, params = _text_model(causal=False, pool_type="gap")
  out_short, _ = model.apply({"params": params}, jnp.array([[2, 5, 6, 1, 0, 0]]))
  # Two more padding positions (their position embeddings are arbitrary: they are masked).
  params_long = dict(params, pos_embedding=jnp.concatenate(
      [params["pos_embedding"], jnp.ones((1, 2, 16))], axis=1))
  out_long, _ = model.apply({"params": params_long}, jnp.array([[2, 5, 6, 1, 0, 0, 0, 0]]))
  np.testing.assert_allclose(out_short, out_long, rtol=1e-5, atol=1e-6)


def _two_tower_config(**kw):
  tower = dict(width=16, depth=1, mlp_dim=32, num_heads=2)
  return ml_collections.ConfigDict(dict(img=dict(tower, patch_size=4), txt=dict(tower),
                                        out_dim=8, logit_scale_init=10.0, **kw))


def test_two_towers_embeddings_are_normalised_and_named():
  model = two_towers.make(_two_tower_config(logit_bias_init=-10.0), vocab_size=30)
  images, tokens = jnp.ones((3, 8, 8, 3)), jnp.array([[2, 4, 1, 0]] * 3)
  params = model.init(jax.random.key(0), images, tokens)["params"]
  assert set(params) == {"img", "txt", "logit_scale", "logit_bias"}
  zimg, ztxt, extras = model.apply({"params": params}, images, tokens)
  np.testing.assert_allclose(np.linalg.norm(zimg, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(ztxt, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(extras["logit_scale"], 10.0, rtol=1e-6)
  np.testing.assert_allclose(extras["logit_bias"], -10.0)
  # One tower at a time, as evaluators call it.
  only_img, none_txt, _ = model.apply({"params": params}, images, None)
  assert none_txt is None
  np.testing.assert_allclose(only_img, zimg, rtol=1e-6)


def test_two_towers_config_errors():
  with pytest.raises(config_lib.ConfigError, match="differ in width"):
    config = _two_tower_config()
    config.txt.head = False
    two_towers.make(config, vocab_size=30)
  with pytest.raises(config_lib.ConfigError, match="model.img.widht"):
    config = _two_tower_config()
    config.img.widht = 3
    two_towers.make(config, vocab_size=30)
  with pytest.raises(config_lib.ConfigError, match="smaller than the tokenizer"):
    config = _two_tower_config()
    config.txt.vocab_size = 10
    two_towers.make(config, vocab_size=30)


def test_a_resnet_image_tower_only_where_a_resnet_is_built():
  """The two-tower model takes `model.img.arch` (a ResNet: LiT on DINO's ResNet-50, say);
  the classifier, DINO and joint models take ViTs and say so in one line."""
  from agriclip_jax.models import classifier  # pylint: disable=g-import-not-at-top
  from agriclip_jax.models import resnet  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(dict(
      img=dict(arch="resnet18", head=False), txt=dict(width=512, depth=1, num_heads=2,
                                                      mlp_dim=64, head=False),
      out_dim=16, logit_scale_init=10.0))
  model = two_towers.make(config, vocab_size=50)
  assert two_towers.image_tower(model.image) is resnet.Model
  assert two_towers.embedding_width(model.image) == 512  # ResNet-18's last stage, no head.
  # Any number of stages: the width is what the tower outputs.
  three_stages = two_towers.tower_kwargs(dict(arch="resnet", depths=(1, 1, 1), width=8,
                                              block="bottleneck", head=False),
                                         "img", None, "float32", resnet_ok=True)
  features, _ = jax.eval_shape(resnet.Model(**three_stages).init_with_output,
                               jax.random.key(0), jnp.zeros((1, 32, 32, 3)))[0]
  assert two_towers.embedding_width(three_stages) == features.shape[-1] == 8 * 4 * 4
  with pytest.raises(config_lib.ConfigError, match="ResNet image tower is supported by the "
                     "contrastive trainer .* only; this model takes a ViT"):
    classifier.make(config, 10)


@pytest.mark.parametrize("remat", [True, "dots", "dots_all"])
def test_remat_policies_keep_outputs_and_gradients(remat):
  """(What they save shows on GPUs/TPUs; XLA's CPU memory analysis does not reflect it.)"""
  x = jax.random.normal(jax.random.key(0), (4, 16, 32))
  kwargs = dict(depth=2, num_heads=2, mlp_dim=64)
  plain = layers.Encoder(**kwargs)
  params = plain.init(jax.random.key(1), x)

  def loss_and_grad(module):
    return jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(module.apply(p, x) ** 2),
                                      argnums=(0, 1)))(params, x)

  value, grads = loss_and_grad(plain)
  r_value, r_grads = loss_and_grad(layers.Encoder(**kwargs, remat=remat))
  np.testing.assert_allclose(r_value, value, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               r_grads, grads)
  # The blocks really are rematerialised, under the named policy.
  jaxpr = str(jax.make_jaxpr(lambda p: layers.Encoder(**kwargs, remat=remat).apply(p, x))(params))
  assert jaxpr.count("remat") == 2 and "remat" not in str(jax.make_jaxpr(plain.apply)(params, x))
  expected = {True: "policy=None", "dots": "only_if_no_batch_dims=True)",
              "dots_all": "only_if_no_batch_dims=False)"}[remat]
  assert expected in jaxpr
  assert layers.remat_policy(True) == layers.remat_policy("full") == (True, None)
  assert layers.remat_policy("none") == layers.remat_policy(False) == (False, None)


@pytest.mark.parametrize("remat", [False, "dots"])
def test_scanned_blocks_equal_the_unrolled_blocks_and_compile_one_block(remat):
  """`scan=True` keeps the per-block parameters and computes the same outputs and gradients
  as the unrolled loop, from one traced block instead of `depth`."""
  x = jax.random.normal(jax.random.key(0), (3, 8, 32))
  mask = jnp.tril(jnp.ones((8, 8), bool))[None, None]
  kwargs = dict(depth=3, num_heads=2, mlp_dim=48, layer_scale=0.5, remat=remat)
  unrolled, scanned = layers.Encoder(**kwargs), layers.Encoder(**kwargs, scan=True)
  params = unrolled.init(jax.random.key(1), x, mask)
  jax.tree.map(np.testing.assert_array_equal, scanned.init(jax.random.key(1), x, mask), params)
  assert sorted(params["params"]) == ["block00", "block01", "block02", "norm"]

  def loss_and_grad(module):
    return jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(module.apply(p, x, mask) ** 2),
                                      argnums=(0, 1)))(params, x)

  value, grads = loss_and_grad(unrolled)
  s_value, s_grads = loss_and_grad(scanned)
  np.testing.assert_allclose(s_value, value, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               s_grads, grads)
  jaxpr = lambda module: str(jax.make_jaxpr(lambda p: module.apply(p, x, mask))(params))
  # q, k, v, out, fc1, fc2 and attention's two: 8 matmuls per traced block.
  assert jaxpr(unrolled).count("dot_general") == 3 * 8
  assert jaxpr(scanned).count("dot_general") == 8 and "scan[" in jaxpr(scanned)
  assert ("remat" in jaxpr(scanned)) == bool(remat)


def test_scanned_dropout_draws_from_the_dropout_stream():
  x = jax.random.normal(jax.random.key(0), (2, 8, 32))
  encoder = layers.Encoder(depth=2, num_heads=2, mlp_dim=48, dropout=0.5, scan=True)
  params = encoder.init(jax.random.key(1), x)
  run = lambda key: encoder.apply(params, x, train=True, rngs={"dropout": jax.random.key(key)})
  np.testing.assert_array_equal(run(3), run(3))
  assert not np.allclose(run(3), run(4))
  np.testing.assert_allclose(encoder.apply(params, x),
                             layers.Encoder(depth=2, num_heads=2, mlp_dim=48).apply(params, x),
                             rtol=1e-5, atol=1e-5)


def test_scan_is_a_tower_option_that_keeps_the_parameters():
  def make(scan):
    config = _two_tower_config()
    for tower in (config.img, config.txt):
      tower.update(depth=2, scan=scan)
    return two_towers.make(config, vocab_size=30)

  scanned, plain = make(True), make(False)
  images, tokens = jnp.ones((2, 32, 32, 3)), jnp.array([[3, 4, 5, 0], [6, 7, 0, 0]])
  params = plain.init(jax.random.key(0), images, tokens)
  jax.tree.map(np.testing.assert_array_equal,
               scanned.init(jax.random.key(0), images, tokens), params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               scanned.apply(params, images, tokens), plain.apply(params, images, tokens))


def test_unknown_remat_policy_is_one_line():
  config = _two_tower_config()
  config.img.remat = "everything"
  with pytest.raises(ValueError, match=r"model.img.remat='everything': expected True"):
    two_towers.make(config, vocab_size=30)


def test_bfloat16_towers_compute_matmuls_in_bf16_and_keep_float32_parameters_and_outputs():
  model_32 = two_towers.make(_two_tower_config(), vocab_size=30)
  model_16 = two_towers.make(_two_tower_config(dtype="bfloat16"), vocab_size=30)
  images = jax.random.uniform(jax.random.key(2), (3, 8, 8, 3))
  tokens = jnp.array([[2, 4, 7, 1, 0]] * 3)
  params = model_16.init(jax.random.key(0), images, tokens)["params"]
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  jaxpr = jax.make_jaxpr(lambda p: model_16.apply({"params": p}, images, tokens))(params)
  matmuls = [e for e in jaxpr.jaxpr.eqns if e.primitive.name in ("dot_general",
                                                                  "conv_general_dilated")]
  assert matmuls and all(v.aval.dtype == jnp.bfloat16 for e in matmuls for v in e.invars)
  zimg, ztxt, _ = model_16.apply({"params": params}, images, tokens)
  assert zimg.dtype == ztxt.dtype == jnp.float32  # The loss sees float32 embeddings.
  zimg_32, ztxt_32, _ = model_32.apply({"params": params}, images, tokens)
  np.testing.assert_allclose(zimg, zimg_32, atol=3e-2)
  np.testing.assert_allclose(ztxt, ztxt_32, atol=3e-2)
