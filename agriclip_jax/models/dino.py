"""DINO: a ViT backbone (`img`) with a projection head (`head`), used as student and teacher.

The head is an MLP to a bottleneck, L2-normalised, then a weight-normalised linear layer to
`out_dim` prototypes (`head/last_layer`, whose direction is `kernel`; with
`norm_last_layer` its per-prototype scale is fixed at 1, as in the DINO recipe).
"""

from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from agriclip_jax.models import layers
from agriclip_jax.models import two_towers
from agriclip_jax.models import vit


class WeightNormDense(nn.Module):
  """x @ (g * v / ||v||) with column-normalised v; g is learned unless `fixed_scale`."""
  features: int
  fixed_scale: bool = True

  @nn.compact
  def __call__(self, x):
    v = self.param("kernel", nn.initializers.truncated_normal(0.02),
                   (x.shape[-1], self.features), jnp.float32)
    w = v / jnp.linalg.norm(v, axis=0, keepdims=True)
    if not self.fixed_scale:
      w = w * self.param("scale", nn.initializers.ones, (self.features,), jnp.float32)
    return x @ w.astype(x.dtype)


class Head(nn.Module):
  out_dim: int = 65536
  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  num_layers: int = 3
  norm_last_layer: bool = True

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers - 1):
      x = layers.ACTIVATIONS["gelu"](nn.Dense(self.hidden_dim, name=f"fc{i}")(x))
    x = nn.Dense(self.bottleneck_dim, name=f"fc{self.num_layers - 1}")(x)
    x = two_towers.l2_normalize(x.astype(jnp.float32))
    return WeightNormDense(self.out_dim, self.norm_last_layer, name="last_layer")(x)


class Model(nn.Module):
  """Returns (prototype logits, backbone features)."""
  image: Mapping[str, Any]
  head: Mapping[str, Any]

  @nn.compact
  def __call__(self, images, train: bool = False):
    features, _ = vit.Model(**self.image, name="img")(images, train=train)
    return Head(**self.head, name="head")(features.astype(jnp.float32)), features


def make(config) -> Model:
  """The model a DINO `config.model` describes: `img` (tower kwargs, no head) and `head`."""
  dtype = two_towers.check_dtype(config.get("dtype", "float32"))
  image = two_towers.tower_kwargs(config.img, "img", None, dtype)
  return Model(image=image, head=dict(config.head))
