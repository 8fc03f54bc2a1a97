"""Transformer pieces shared by the image and text towers (pre-LayerNorm blocks)."""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from agriclip_jax import config_lib

# Transformer sizes shared by both towers: name -> (width, depth, mlp_dim, num_heads).
SIZES = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
}


def size(name: str) -> dict[str, int]:
  if name not in SIZES:
    raise config_lib.ConfigError(
        f"unknown transformer size {name!r}; expected one of {list(SIZES)}")
  width, depth, mlp_dim, num_heads = SIZES[name]
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": nn.relu,
}


class MlpBlock(nn.Module):
  mlp_dim: int
  activation: str = "gelu"
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    width = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1")(x)
    x = ACTIVATIONS[self.activation](x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(width, dtype=self.dtype, name="fc2")(x)


class Attention(nn.Module):
  """Multi-head attention; `mask` is boolean [batch or 1, 1, q, k] (True = may attend)."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, kv=None, mask=None):
    kv = x if kv is None else kv
    width = x.shape[-1]
    if width % self.num_heads:
      raise config_lib.ConfigError(f"width {width} is not divisible by num_heads {self.num_heads}")
    dense = lambda name: nn.DenseGeneral((self.num_heads, width // self.num_heads),
                                         dtype=self.dtype, name=name)
    q, k, v = dense("query")(x), dense("key")(kv), dense("value")(kv)
    y = jax.nn.dot_product_attention(q, k, v, mask=mask)  # [b, t, heads, head_dim]
    return nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, name="out")(y)


class LayerScale(nn.Module):
  """Per-channel learned scale of a residual branch (CaiT / DINOv2)."""
  init_value: float = 1e-5

  @nn.compact
  def __call__(self, x):
    gamma = self.param("gamma", nn.initializers.constant(self.init_value), (x.shape[-1],),
                       jnp.float32)
    return x * gamma.astype(x.dtype)


class EncoderBlock(nn.Module):
  """Pre-LayerNorm block; `layer_scale` (an initial value) scales both residual branches."""
  num_heads: int
  mlp_dim: int
  activation: str = "gelu"
  dropout: float = 0.0
  layer_norm_eps: float = 1e-6
  layer_scale: float | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, train: bool = False):
    norm = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name=name)
    drop = nn.Dropout(self.dropout, deterministic=not train)
    scale = ((lambda name, y: LayerScale(self.layer_scale, name=name)(y))
             if self.layer_scale is not None else (lambda name, y: y))
    y = Attention(self.num_heads, dtype=self.dtype, name="attn")(norm("norm1")(x), mask=mask)
    x = x + drop(scale("ls1", y))
    y = MlpBlock(self.mlp_dim, self.activation, self.dropout, self.dtype,
                 name="mlp")(norm("norm2")(x), train)
    return x + drop(scale("ls2", y))


# `remat` of a tower (model.img.remat / model.txt.remat): what each block keeps for the
# backward pass; the rest is recomputed there. "full" (or True) keeps only the block's input;
# "dots" keeps the weight matmuls' outputs and recomputes the cheap elementwise work (norms,
# GELU, attention softmax); "dots_all" also keeps the attention matmuls. False / "none": keep
# everything (fastest, most memory).
REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_all": jax.checkpoint_policies.dots_saveable,
}


def remat_policy(remat: bool | str):
  """(whether to rematerialise, the jax.checkpoint policy) of a `remat` setting."""
  if remat is False or remat == "none":
    return False, None
  if remat is True:
    remat = "full"
  if remat not in REMAT_POLICIES:
    raise config_lib.ConfigError(
        f"remat={remat!r}: expected True, False, 'none' or one of {list(REMAT_POLICIES)}")
  return True, REMAT_POLICIES[remat]


class Encoder(nn.Module):
  """`depth` blocks and a final LayerNorm. `remat` (see REMAT_POLICIES) recomputes parts of
  the blocks in the backward pass.

  `scan=True` runs the blocks as one `jax.lax.scan` over their parameters stacked on the fly,
  so XLA compiles one block instead of `depth` (meant for deep towers on GPUs/TPUs; on a
  2-core CPU at depth 12 it compiles and steps slower, see the README). Parameters stay
  stored per block (`block00`, `block01`, ...): checkpoints,
  importers and exporters are the same whichever way a run computes, and a checkpoint
  written with one setting loads with the other. The stacked copy costs one tower's block
  parameters of memory per device. Outputs and gradients equal the unrolled form's; dropout
  draws its masks from other random streams.
  """
  depth: int
  num_heads: int
  mlp_dim: int
  activation: str = "gelu"
  dropout: float = 0.0
  layer_norm_eps: float = 1e-6
  remat: bool | str = False
  dtype: Any = jnp.float32
  layer_scale: float | None = None
  scan: bool = False

  def _block(self, module=EncoderBlock, **kwargs):
    return module(self.num_heads, self.mlp_dim, self.activation, self.dropout,
                  self.layer_norm_eps, self.layer_scale, self.dtype, **kwargs)

  @nn.compact
  def __call__(self, x, mask=None, train: bool = False):
    remat, policy = remat_policy(self.remat)
    # Initialisation always unrolls: it creates the per-block parameters.
    if self.scan and self.depth > 1 and not self.is_initializing():
      x = self._scanned(x, mask, train, remat, policy)
    else:
      block = (nn.remat(EncoderBlock, static_argnums=(3,), policy=policy) if remat
               else EncoderBlock)
      for i in range(self.depth):
        x = self._block(block, name=f"block{i:02d}")(x, mask, train)
    return nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="norm")(x)

  def _scanned(self, x, mask, train, remat, policy):
    params = self.variables["params"]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves),
                           *(params[f"block{i:02d}"] for i in range(self.depth)))
    keys = None
    if train and self.dropout > 0:
      keys = jax.random.split(self.make_rng("dropout"), self.depth)
    block = self._block(parent=None)  # Unbound: applied to each layer's slice of `stacked`.

    def one_block(x, layer):
      layer_params, key = layer
      rngs = {} if key is None else {"dropout": key}
      return block.apply({"params": layer_params}, x, mask, train, rngs=rngs), None

    if remat:
      one_block = jax.checkpoint(one_block, policy=policy, prevent_cse=False)
    return jax.lax.scan(one_block, x, (stacked, keys))[0]


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned query attends over the tokens."""
  num_heads: int
  mlp_dim: int
  layer_norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  activation: str = "gelu"

  @nn.compact
  def __call__(self, x, mask=None):
    width = x.shape[-1]
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, width), jnp.float32)
    probe = jnp.tile(probe, (x.shape[0], 1, 1)).astype(self.dtype)
    x = Attention(self.num_heads, dtype=self.dtype, name="attn")(probe, x, mask=mask)
    y = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="norm")(x)
    x = x + MlpBlock(self.mlp_dim, self.activation, dtype=self.dtype, name="mlp")(y)
    return x[:, 0]


def pool(x, pool_type: str, index=None, mask=None, map_head: nn.Module | None = None):
  """[b, t, d] -> [b, d]. `index` [b] is the token to take for 'index' pooling."""
  if pool_type == "tok":
    return x[:, 0]
  if pool_type == "gap":
    if mask is None:
      return x.mean(axis=1)
    weights = mask.astype(x.dtype)[..., None]
    return (x * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1)
  if pool_type == "index":
    return jnp.take_along_axis(x, index[:, None, None], axis=1)[:, 0]
  if pool_type == "map":
    return map_head(x, mask=None if mask is None else mask[:, None, None, :])
  raise config_lib.ConfigError(f"unknown pool_type {pool_type!r}")
