"""Vision Transformer image tower, built from a variant string like "B/16" plus overrides."""

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from agriclip_jax import config_lib
from agriclip_jax.models import layers



def parse_variant(variant: str) -> dict[str, Any]:
  """"B/16" -> dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16)."""
  match = re.fullmatch(r"(\w+)/(\d+)", variant or "")
  if not match or match.group(1) not in layers.SIZES:
    raise config_lib.ConfigError(f"unknown ViT variant {variant!r}; expected a size from "
                     f"{list(layers.SIZES)} and a patch size, e.g. 'B/16'")
  return dict(layers.size(match.group(1)), patch_size=int(match.group(2)))


class Model(nn.Module):
  """ViT. Returns (pooled output, dict of intermediate outputs).

  The position embedding is stored as a [1, gh, gw, width] grid sized by the image at init;
  inputs of another size (DINO's local crops, fine-tuning at a new resolution) use a bilinear
  resize of it. Prefix tokens (a class token, then `num_registers` register tokens) carry no
  position embedding: an imported checkpoint's class-token position is folded into `cls`.
  Options that imported families need: `pre_norm` (CLIP's LayerNorm before the encoder),
  `patch_bias`, `head_bias`, `layer_scale` (DINOv2; its initial value), `num_registers`.
  """
  width: int = 768
  depth: int = 12
  mlp_dim: int = 3072
  num_heads: int = 12
  patch_size: int = 16
  pool_type: str = "gap"  # tok | gap | map
  num_classes: int | None = None  # A linear head to this width ("head"), if set.
  activation: str = "gelu"
  dropout: float = 0.0
  layer_norm_eps: float = 1e-6
  remat: bool | str = False  # See layers.REMAT_POLICIES.
  scan: bool = False  # The blocks as one lax.scan (see layers.Encoder).
  dtype: Any = jnp.float32
  class_token: bool | None = None  # None: only for pool_type "tok".
  num_registers: int = 0
  pre_norm: bool = False
  patch_bias: bool = True
  head_bias: bool = True
  layer_scale: float | None = None

  @nn.compact
  def __call__(self, image, train: bool = False):
    height, width = image.shape[1:3]
    if self.patch_size < 1 or height % self.patch_size or width % self.patch_size:
      raise config_lib.ConfigError(f"image size {height}x{width} is not a multiple of the "
                                   f"ViT patch size {self.patch_size}")
    out = {}
    x = nn.Conv(self.width, (self.patch_size, self.patch_size),
                strides=(self.patch_size, self.patch_size), padding="VALID",
                use_bias=self.patch_bias, dtype=self.dtype,
                name="embedding")(image.astype(self.dtype))
    n, gh, gw, c = x.shape
    x = x + self._position_embedding(gh, gw, c).astype(self.dtype)
    x = x.reshape(n, gh * gw, c)
    prefix = []
    if self.class_token or (self.class_token is None and self.pool_type == "tok"):
      prefix.append(self.param("cls", nn.initializers.zeros, (1, 1, c), jnp.float32))
    if self.num_registers:
      prefix.append(self.param("registers", nn.initializers.normal(0.02),
                               (1, self.num_registers, c), jnp.float32))
    if prefix:
      prefix = jnp.concatenate(prefix, axis=1).astype(self.dtype)
      x = jnp.concatenate([jnp.broadcast_to(prefix, (n,) + prefix.shape[1:]), x], axis=1)
    num_prefix = x.shape[1] - gh * gw
    if self.pre_norm:
      x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="pre_norm")(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = layers.Encoder(self.depth, self.num_heads, self.mlp_dim, self.activation,
                       self.dropout, self.layer_norm_eps, self.remat, self.dtype,
                       self.layer_scale, scan=self.scan, name="encoder")(x, train=train)
    out["encoded"] = x
    if self.pool_type == "gap":  # Over the patches, not the prefix tokens.
      x = x[:, num_prefix:]
    map_head = (layers.MAPHead(self.num_heads, self.mlp_dim, self.layer_norm_eps, self.dtype,
                               self.activation, name="map_head")
                if self.pool_type == "map" else None)
    x = layers.pool(x, self.pool_type, map_head=map_head)
    out["pre_logits"] = x
    if self.num_classes:
      x = nn.Dense(self.num_classes, use_bias=self.head_bias, dtype=self.dtype, name="head")(x)
    out["logits"] = x
    return x, out

  def _position_embedding(self, gh: int, gw: int, width: int):
    if self.is_initializing() or not self.has_variable("params", "pos_embedding"):
      shape = (1, gh, gw, width)
    else:
      shape = self.get_variable("params", "pos_embedding").shape
    posemb = self.param("pos_embedding",
                        nn.initializers.normal(stddev=1 / np.sqrt(width)), shape, jnp.float32)
    if shape[1:3] != (gh, gw):
      posemb = jax.image.resize(posemb, (1, gh, gw, width), method="bilinear")
    return posemb
