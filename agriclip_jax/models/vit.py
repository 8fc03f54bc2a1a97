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
  resize of it.
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
  remat: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image, train: bool = False):
    height, width = image.shape[1:3]
    if self.patch_size < 1 or height % self.patch_size or width % self.patch_size:
      raise config_lib.ConfigError(f"image size {height}x{width} is not a multiple of the "
                                   f"ViT patch size {self.patch_size}")
    out = {}
    x = nn.Conv(self.width, (self.patch_size, self.patch_size),
                strides=(self.patch_size, self.patch_size), padding="VALID",
                dtype=self.dtype, name="embedding")(image.astype(self.dtype))
    n, gh, gw, c = x.shape
    x = x + self._position_embedding(gh, gw, c).astype(self.dtype)
    x = x.reshape(n, gh * gw, c)
    if self.pool_type == "tok":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, c), jnp.float32)
      x = jnp.concatenate([jnp.tile(cls.astype(self.dtype), (n, 1, 1)), x], axis=1)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = layers.Encoder(self.depth, self.num_heads, self.mlp_dim, self.activation,
                       self.dropout, self.layer_norm_eps, self.remat, self.dtype,
                       name="encoder")(x, train=train)
    out["encoded"] = x
    map_head = (layers.MAPHead(self.num_heads, self.mlp_dim, self.layer_norm_eps, self.dtype,
                               name="map_head") if self.pool_type == "map" else None)
    x = layers.pool(x, self.pool_type, map_head=map_head)
    out["pre_logits"] = x
    if self.num_classes:
      x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
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
