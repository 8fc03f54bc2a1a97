"""Hugging Face ViT directories: `ViTModel` / `ViTForImageClassification` (model_type "vit":
google/vit-*-in21k, facebook/dino-vit*, and the many fine-tuned ViTs on the Hub):
config.json + model.safetensors (or pytorch_model.bin).

The image tower maps onto `vit.Model` with the "hf_vit" preset: a class token, pre-LayerNorm blocks with exact GELU, and
class-token pooling after the final LayerNorm (eps from the config, 1e-12 by default). That
pooled vector is HF's `last_hidden_state[:, 0]`. HF's `pooler` (a Linear + tanh on it, which
`ViTModel` adds unless built without it) has no place in our tower and is dropped. A
classification directory reads as its backbone (`vit.` prefix), and its `classifier` (a Linear
on the same pooled vector) goes to `Checkpoint.optional` as the tower's head (loaded with
`init.img.classifier`). Masked-image-modelling parts (`mask_token`, the decoder) are dropped.

Position embeddings at another resolution: HF's `interpolate_pos_encoding` resizes the patch
grid with PyTorch's plain bicubic (align_corners=False, no antialiasing), which is
`resample.resample_grid`: resampled at import, the output equals HF's at the new size.
Images: normalised as the directory's preprocessor_config.json says, else as
`ViTImageProcessor` does by default (mean = std = 0.5).
"""

import os

import numpy as np

from agriclip_jax.models.importers import common
from agriclip_jax.models.importers import hf_clip
from agriclip_jax.models.importers.common import Rule, conv, linear

FORMAT = "hf_vit"
MODEL_TYPE = "vit"
MEAN = STD = (0.5, 0.5, 0.5)
PREFIXES = ("vit.",)  # ViTForImageClassification / ViTForMaskedImageModeling's backbone.
# A transformer block's keys, and where its parameters go (ViT and DINOv2 alike).
BLOCK, OUT = r"encoder\.layer\.(?P<block>\d+)\.", "img/encoder/{block}/"


def shared_rules() -> list[Rule]:
  """What Hugging Face's ViT and DINOv2 name alike: embeddings, attention, the final norm."""
  return [
      Rule(r"embeddings\.cls_token", "img/cls"),
      Rule(r"embeddings\.mask_token", None),  # Replaces masked patches in pretraining only.
      Rule(r"embeddings\.position_embeddings", "img/pos_embedding"),
      Rule(r"embeddings\.patch_embeddings\.projection\.weight", "img/embedding/kernel", conv),
      Rule(r"embeddings\.patch_embeddings\.projection\.bias", "img/embedding/bias"),
      Rule(BLOCK + r"attention\.attention\.(?P<attn>query|key|value)\.weight",
           OUT + "attn/{attn}/kernel", linear),
      Rule(BLOCK + r"attention\.attention\.(?P<attn>query|key|value)\.bias",
           OUT + "attn/{attn}/bias"),
      Rule(BLOCK + r"attention\.output\.dense\.weight", OUT + "attn/out/kernel", linear),
      Rule(BLOCK + r"attention\.output\.dense\.bias", OUT + "attn/out/bias"),
      Rule(r"layernorm\.weight", "img/encoder/norm/scale"),
      Rule(r"layernorm\.bias", "img/encoder/norm/bias"),
  ]


def rules() -> list[Rule]:
  block, out = BLOCK, OUT
  return [
      *shared_rules(),
      Rule(block + r"layernorm_before\.weight", out + "norm1/scale"),
      Rule(block + r"layernorm_before\.bias", out + "norm1/bias"),
      Rule(block + r"layernorm_after\.weight", out + "norm2/scale"),
      Rule(block + r"layernorm_after\.bias", out + "norm2/bias"),
      Rule(block + r"intermediate\.dense\.weight", out + "mlp/fc1/kernel", linear),
      Rule(block + r"intermediate\.dense\.bias", out + "mlp/fc1/bias"),
      Rule(block + r"output\.dense\.weight", out + "mlp/fc2/kernel", linear),
      Rule(block + r"output\.dense\.bias", out + "mlp/fc2/bias"),
      Rule(r"pooler\.dense\.(weight|bias)", None),  # Linear + tanh: no such layer here.
      Rule(r"classifier\.weight", "img/head/kernel", linear),
      Rule(r"classifier\.bias", "img/head/bias"),
      Rule(r"decoder\..*", None),  # ViTForMaskedImageModeling's pixel decoder.
  ]


def square(value, name: str) -> int:
  """A config size that may be an int or a [height, width] pair; only square ones fit."""
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise common.CheckpointImportError(f"{name} {list(value)} is not square")
    value = value[0]
  return int(value)


def zero_qkv_biases(params: dict, depth: int, width: int) -> None:
  """Bias-free q/k/v projections (config qkv_bias=False) are zero biases in our attention."""
  for block in range(depth):
    for name in ("query", "key", "value"):
      params[f"img/encoder/block{block:02d}/attn/{name}/bias"] = np.zeros(width, np.float32)


def detect(path: str) -> bool:
  return hf_clip.model_type(path) == MODEL_TYPE


def tower(config: dict) -> dict:
  """`model.img` keyword arguments from a Hugging Face ViT config."""
  act = config.get("hidden_act", "gelu")
  if act not in hf_clip.ACTIVATIONS:
    raise common.CheckpointImportError(f"activation {act!r} is not supported")
  return dict(preset="hf_vit", width=config["hidden_size"], depth=config["num_hidden_layers"],
              mlp_dim=config["intermediate_size"], num_heads=config["num_attention_heads"],
              patch_size=square(config.get("patch_size", 16), "patch_size"),
              activation=hf_clip.ACTIVATIONS[act],
              layer_norm_eps=config.get("layer_norm_eps", 1e-12))


def read(path: str) -> common.Checkpoint:
  config = common.read_json(os.path.join(path, "config.json"))
  state = common.strip_prefixes(common.read_weights(hf_clip.weights_file(path)), PREFIXES)
  params = common.convert(state, rules(), path)
  common.fold_class_position(params, "img", num_prefix=1)
  img = tower(config)
  if not config.get("qkv_bias", True):
    zero_qkv_biases(params, img["depth"], img["width"])
  optional = {k: params.pop(k) for k in list(params) if k.startswith("img/head/")}
  size = square(config.get("image_size", 224), "image_size")
  prep = {"mean": MEAN, "std": STD, **hf_clip.preprocessing(path, size)}
  return common.Checkpoint(FORMAT, path, params, dict(img=img), optional=optional, **prep)
