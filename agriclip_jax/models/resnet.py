"""ResNet image tower (torchvision layout, v1.5), for frozen pretrained backbones.

AgriCLIP's published aligners map DINO ResNet-50 features (2048-d, global average pooled) into
CLIP space, so this tower exists to run such a checkpoint as torchvision does, bit for bit in
layout: a 7x7/2 stem and 3x3/2 max pool, then four stages of residual blocks whose first block
strides on its 3x3 convolution (v1.5) and projects the shortcut with a strided 1x1 conv + BN.

BatchNorm is frozen (torchvision's FrozenBatchNorm2d): it always uses the running statistics,
which are stored in `params` next to the affine scale and bias (`.../bn1/{scale,bias,mean,
var}`). Why in `params` and not a "batch_stats" collection: trainers, checkpoints, sharding
and importers all handle one `params` tree, and a second collection would have to be threaded
through each of them for a tower we only use frozen. Why not folded into the convolutions:
each checkpoint tensor then maps to one parameter (the importer stays a per-key mapping table
that reads backwards as an exporter), and the statistics stay inspectable. The statistics pass
through `stop_gradient`, so their gradient is zero and no optimizer moves them (their names
are not `kernel`, so the default `optim.decay_regex` does not decay them either); freeze them
outright with an optim rule `("img/.*/(mean|var)", None)` to keep no optimizer state for them.
Training this tower from scratch is possible but un-normalised; it is meant to be imported.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from agriclip_jax import config_lib

# variant -> (block type, blocks per stage), as torchvision's resnet18 ... resnet152.
VARIANTS = {
    "resnet18": dict(block="basic", depths=(2, 2, 2, 2)),
    "resnet34": dict(block="basic", depths=(3, 4, 6, 3)),
    "resnet50": dict(block="bottleneck", depths=(3, 4, 6, 3)),
    "resnet101": dict(block="bottleneck", depths=(3, 4, 23, 3)),
    "resnet152": dict(block="bottleneck", depths=(3, 8, 36, 3)),
}
EXPANSION = {"basic": 1, "bottleneck": 4}

# He-normal on the output fan, as torchvision initialises its convolutions.
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def parse_variant(variant: str) -> dict[str, Any]:
  """"resnet50" -> dict(block="bottleneck", depths=(3, 4, 6, 3)); plain "resnet" -> {} (the
  fields are given explicitly, for non-standard depths or widths)."""
  if variant == "resnet":
    return {}
  if variant not in VARIANTS:
    raise config_lib.ConfigError(f"unknown ResNet variant {variant!r}; expected one of "
                                 f"{list(VARIANTS)}")
  return dict(VARIANTS[variant])


def tower_kwargs(config: dict[str, Any], num_classes: int | None = None,
                 dtype: str = "float32") -> dict[str, Any]:
  """`Model` keyword arguments from a tower config dict: `arch` (a variant), then overrides."""
  kwargs = dict(config)
  config_lib.check_keys(kwargs, {"arch", "block", "depths", "width", "bn_eps"}, "model.img")
  arch = kwargs.pop("arch", None)
  base = parse_variant(arch) if arch else {}
  base.update(kwargs)
  base["depths"] = tuple(base.get("depths", Model.depths))
  return dict(base, num_classes=num_classes, dtype=jnp.dtype(dtype))


def feature_width(kwargs: dict[str, Any]) -> int:
  """Width of the pooled features of a `Model(**kwargs)`: its last stage's output channels."""
  depths = kwargs.get("depths", Model.depths)
  block = kwargs.get("block", Model.block)
  return kwargs.get("width", Model.width) * 2 ** (len(depths) - 1) * EXPANSION[block]


class FrozenBatchNorm(nn.Module):
  """y = (x - mean) / sqrt(var + eps) * scale + bias with the stored (running) statistics."""
  eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    # Statistics, not weights: never moved by gradients (see the module docstring).
    mean = jax.lax.stop_gradient(self.param("mean", nn.initializers.zeros, (features,),
                                            jnp.float32))
    var = jax.lax.stop_gradient(self.param("var", nn.initializers.ones, (features,),
                                           jnp.float32))
    multiplier = scale * jax.lax.rsqrt(var + self.eps)
    return x * multiplier.astype(self.dtype) + (bias - mean * multiplier).astype(self.dtype)


def _conv(features: int, kernel: int, stride: int, dtype, name: str) -> nn.Conv:
  """A bias-free conv padded as PyTorch pads (kernel // 2 on every side, not "SAME")."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=False, kernel_init=_CONV_INIT,
                 dtype=dtype, name=name)


def _block_convs(block: str, planes: int, stride: int) -> list[tuple[int, int, int]]:
  """(kernel, features, stride) of a block's convs; v1.5 strides on the bottleneck's 3x3."""
  if block == "bottleneck":
    return [(1, planes, 1), (3, planes, stride), (1, planes * EXPANSION[block], 1)]
  return [(3, planes, stride), (3, planes, 1)]


class Block(nn.Module):
  """One residual block: "bottleneck" (1x1 -> 3x3 -> 1x1 to 4x planes) or "basic" (3x3 x2);
  convs `conv{i}` with BN `bn{i}`, a ReLU between them and after the residual sum."""
  planes: int
  stride: int = 1
  block: str = "bottleneck"
  bn_eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    convs = _block_convs(self.block, self.planes, self.stride)
    y = x
    for i, (kernel, features, stride) in enumerate(convs, start=1):
      y = _conv(features, kernel, stride, self.dtype, f"conv{i}")(y)
      y = FrozenBatchNorm(self.bn_eps, self.dtype, name=f"bn{i}")(y)
      y = nn.relu(y) if i < len(convs) else y
    out_features = convs[-1][1]
    if self.stride != 1 or x.shape[-1] != out_features:  # Project the shortcut to match.
      x = _conv(out_features, 1, self.stride, self.dtype, "downsample_conv")(x)
      x = FrozenBatchNorm(self.bn_eps, self.dtype, name="downsample_bn")(x)
    return nn.relu(y + x)


class Stem(nn.Module):
  """7x7/2 conv, BN, ReLU, then a 3x3/2 max pool (padded with -inf, as PyTorch pads)."""
  width: int = 64
  bn_eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = _conv(self.width, 7, 2, self.dtype, "conv")(x)
    x = nn.relu(FrozenBatchNorm(self.bn_eps, self.dtype, name="bn")(x))
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class Stage(nn.Module):
  """`depth` blocks at `planes`; the first strides (except in the first stage, after the
  pool) and projects the shortcut."""
  planes: int
  depth: int
  stride: int
  block: str = "bottleneck"
  bn_eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for index in range(self.depth):
      x = Block(self.planes, self.stride if index == 0 else 1, self.block, self.bn_eps,
                self.dtype, name=f"block{index}")(x)
    return x


class Model(nn.Module):
  """ResNet on NHWC float images. Returns (pooled features, dict of intermediate outputs).

  Pooled features are the global average of the last stage ([b, 2048] for ResNet-50, what
  DINO ResNet-50 features are); with `num_classes` a linear `head` (torchvision's `fc`) maps
  them to logits, which are then the first output, as in `vit.Model`. Parameter names:
  `stem/{conv,bn}`, `stage{1..4}/block{i}/{conv,bn}{1..3}` and `.../downsample_{conv,bn}`.
  `train` is accepted for the towers' common signature; BatchNorm is frozen either way.
  """
  depths: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  block: str = "bottleneck"  # bottleneck | basic
  num_classes: int | None = None
  bn_eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image, train: bool = False):
    del train  # Frozen BatchNorm behaves the same in training.
    if self.block not in EXPANSION:
      raise config_lib.ConfigError(f"ResNet block {self.block!r} is not one of "
                                   f"{list(EXPANSION)}")
    x = Stem(self.width, self.bn_eps, self.dtype, name="stem")(image.astype(self.dtype))
    for stage, depth in enumerate(self.depths, start=1):
      x = Stage(self.width * 2 ** (stage - 1), depth, 1 if stage == 1 else 2, self.block,
                self.bn_eps, self.dtype, name=f"stage{stage}")(x)
    out = {"feature_map": x}
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
    out["pre_logits"] = x
    if self.num_classes:
      x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
    out["logits"] = x
    return x, out
