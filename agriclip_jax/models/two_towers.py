"""The image-text model: towers `img` (a ViT, or a ResNet when its config names an `arch`) and
`txt` (text transformer) with learned scale.

Parameter paths are `img/...`, `txt/...`, `logit_scale` and `logit_bias`; the optimizer's
freezing rules and the sharding rules match on them.
"""

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from agriclip_jax import config_lib
from agriclip_jax.models import layers
from agriclip_jax.models import presets
from agriclip_jax.models import resnet
from agriclip_jax.models import text
from agriclip_jax.models import vit

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def l2_normalize(x, eps=1e-8):
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


class Model(nn.Module):
  """Call with (images, tokens); either may be None. Returns (zimg, ztxt, extras).

  `zimg`/`ztxt` are L2-normalised embeddings; `image`/`text` are the keyword arguments of the
  towers (see `tower_kwargs`), which are named `img` and `txt`.
  """
  image: Mapping[str, Any]
  text: Mapping[str, Any]
  logit_scale_init: float = 10.0
  logit_bias_init: float | None = None
  max_logit_scale: float = 100.0

  @nn.compact
  def __call__(self, images=None, tokens=None, train: bool = False, image_features=None):
    """`image_features` (the image trunk's `pre_logits`, e.g. from an image cache) stand in
    for `images`: only the image tower's head runs on them."""
    logit_scale = self.param("logit_scale", nn.initializers.constant(
        np.log(self.logit_scale_init)), (), jnp.float32)
    extras = {"logit_scale": jnp.exp(jnp.minimum(logit_scale, np.log(self.max_logit_scale)))}
    if self.logit_bias_init is not None:
      extras["logit_bias"] = self.param(
          "logit_bias", nn.initializers.constant(self.logit_bias_init), (), jnp.float32)
    zimg = ztxt = None
    if image_features is not None:
      zimg = ImageHead(self.image.get("num_classes"), self.image.get("head_bias", True),
                       self.image["dtype"], name="img")(image_features)
    elif images is not None:
      zimg, extras["img"] = image_tower(self.image)(**self.image, name="img")(images,
                                                                              train=train)
    if zimg is not None:
      zimg = zimg.astype(jnp.float32)
      extras["img/norm"] = jnp.linalg.norm(zimg, axis=-1)
      zimg = l2_normalize(zimg)
    if tokens is not None:
      ztxt, extras["txt"] = text.Model(**self.text, name="txt")(tokens, train=train)
      ztxt = ztxt.astype(jnp.float32)
      extras["txt/norm"] = jnp.linalg.norm(ztxt, axis=-1)
      ztxt = l2_normalize(ztxt)
    return zimg, ztxt, extras


class ImageHead(nn.Module):
  """The image tower's head alone (parameters `head/...`, as in the tower): what a LiT run
  from cached trunk features trains. No head (`num_classes` None): the features pass as
  they are."""
  num_classes: int | None
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.num_classes:
      x = nn.Dense(self.num_classes, use_bias=self.use_bias, dtype=self.dtype, name="head")(x)
    return x


def image_tower(kwargs: Mapping[str, Any]) -> type[nn.Module]:
  """The image tower's module for its resolved keyword arguments (see `tower_kwargs`)."""
  return resnet.Model if "depths" in kwargs else vit.Model


def embedding_width(kwargs: Mapping[str, Any]) -> int:
  """Width of a tower's output for its resolved keyword arguments: its head's, else its
  features' (a ResNet's last stage)."""
  if kwargs.get("num_classes"):
    return kwargs["num_classes"]
  return feature_width(kwargs)


def feature_width(kwargs: Mapping[str, Any]) -> int:
  """Width of an image tower's features before its head (`pre_logits`)."""
  return resnet.feature_width(kwargs) if "depths" in kwargs else kwargs["width"]


def require_vit(img_config: Mapping[str, Any], user: str) -> None:
  """One line if `model.img` names a ResNet where `user` builds a ViT."""
  if img_config.get("arch"):
    raise config_lib.ConfigError(
        f"model.img.arch={img_config['arch']!r}: a ResNet image tower is supported by the "
        f"contrastive trainer (CLIP / LiT) only; {user} takes a ViT")


def tower_kwargs(config: Mapping[str, Any], kind: str, out_dim: int | None,
                 dtype: str, resnet_ok: bool = False) -> dict[str, Any]:
  """Tower keyword arguments from a config dict: `preset` (a family, see `presets`), then
  `variant`, then explicit overrides; `head` (bool) adds a linear head to `out_dim`. An image
  config with `arch` (e.g. "resnet50") is a ResNet's (see `resnet.tower_kwargs`), where the
  caller builds one (`resnet_ok`: the two-tower model does; the others take ViTs)."""
  kwargs = dict(config)
  if kind == "img" and kwargs.get("arch"):
    if not resnet_ok:
      require_vit(kwargs, "this model")
    head = kwargs.pop("head", True)
    kwargs.pop("preset", None)
    return resnet.tower_kwargs(kwargs, out_dim if head else None, dtype)
  module = vit.Model if kind == "img" else text.Model
  fields = {f.name for f in dataclasses.fields(module)} - {"parent", "name", "num_classes",
                                                             "dtype"}
  config_lib.check_keys(kwargs, fields | {"variant", "head", "preset"}, f"model.{kind}")
  preset = kwargs.pop("preset", None)
  if preset:
    kwargs = {**presets.get(preset, kind), **kwargs}
  variant = kwargs.pop("variant", None)
  head = kwargs.pop("head", True)
  base = {}
  if variant:
    base = vit.parse_variant(variant) if kind == "img" else layers.size(variant)
  base.update(kwargs)
  try:
    layers.remat_policy(base.get("remat", False))
  except config_lib.ConfigError as e:
    raise config_lib.ConfigError(f"model.{kind}.{e}") from None
  base["num_classes"] = out_dim if head else None
  base["dtype"] = DTYPES[dtype]
  return base


def check_dtype(dtype: str) -> str:
  if dtype not in DTYPES:
    raise config_lib.ConfigError(f"model.dtype {dtype!r} is not one of {list(DTYPES)}")
  return dtype


def make(config, vocab_size: int | None = None) -> Model:
  """The model a `config.model` describes. `vocab_size` comes from the tokenizer."""
  dtype = check_dtype(config.get("dtype", "float32"))
  img = tower_kwargs(config.img, "img", config.out_dim, dtype, resnet_ok=True)
  txt = tower_kwargs(config.txt, "txt", config.out_dim, dtype)
  if vocab_size is not None:
    if txt.get("vocab_size") and txt["vocab_size"] < vocab_size:
      raise config_lib.ConfigError(f"model.txt.vocab_size={txt['vocab_size']} is smaller than the "
                       f"tokenizer's vocabulary ({vocab_size})")
    txt["vocab_size"] = txt.get("vocab_size") or vocab_size
  img_dim, txt_dim = embedding_width(img), embedding_width(txt)
  if img_dim != txt_dim:
    raise config_lib.ConfigError(
        f"image embeddings ({img_dim}) and text embeddings ({txt_dim}) differ in width; give "
        "the towers heads (model.img.head / model.txt.head)")
  return Model(image=img, text=txt, logit_scale_init=config.logit_scale_init,
               logit_bias_init=config.get("logit_bias_init"),
               max_logit_scale=config.get("max_logit_scale", 100.0))

