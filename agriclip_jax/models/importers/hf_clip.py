"""Hugging Face `CLIPModel` directories: config.json + model.safetensors (or
pytorch_model.bin), tokenizer files and preprocessor_config.json.

OpenAI's CLIP (e.g. openai/clip-vit-base-patch16) and most CLIP fine-tunes are published this
way. Both towers, both projections and the logit scale are read.

Single towers saved on their own read as that tower alone: `CLIPVisionModel(WithProjection)`
(model_type "clip_vision_model") and `CLIPTextModel(WithProjection)` ("clip_text_model", e.g.
the text encoders of diffusion pipelines); without the projection, the tower has no head.
"""

import os

import numpy as np

from agriclip_jax.models.importers import common
from agriclip_jax.models.importers.common import Rule, linear, conv

FORMAT = "hf_clip"

ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh"}


def encoder_rules(source: str, target: str) -> list[Rule]:
  """The transformer blocks of Hugging Face's CLIP-family encoders (CLIP, SigLIP)."""
  block = rf"{source}\.layers\.(?P<block>\d+)\."
  out = f"{target}/{{block}}/"
  return [
      Rule(block + r"self_attn\.(?P<attn>q|k|v|out)_proj\.weight", out + "attn/{attn}/kernel",
           linear),
      Rule(block + r"self_attn\.(?P<attn>q|k|v|out)_proj\.bias", out + "attn/{attn}/bias"),
      Rule(block + r"layer_norm(?P<n>[12])\.weight", out + "norm{n}/scale"),
      Rule(block + r"layer_norm(?P<n>[12])\.bias", out + "norm{n}/bias"),
      Rule(block + r"mlp\.(?P<fc>fc[12])\.weight", out + "mlp/{fc}/kernel", linear),
      Rule(block + r"mlp\.(?P<fc>fc[12])\.bias", out + "mlp/{fc}/bias"),
  ]


def rules() -> list[Rule]:
  return [
      Rule(r"logit_scale", "logit_scale"),
      Rule(r"(text|vision)_model\.embeddings\.position_ids", None),  # A buffer, not weights.
      Rule(r"vision_model\.embeddings\.class_embedding", "img/cls"),
      Rule(r"vision_model\.embeddings\.patch_embedding\.weight", "img/embedding/kernel", conv),
      Rule(r"vision_model\.embeddings\.position_embedding\.weight", "img/pos_embedding"),
      Rule(r"vision_model\.pre_layrnorm\.weight", "img/pre_norm/scale"),
      Rule(r"vision_model\.pre_layrnorm\.bias", "img/pre_norm/bias"),
      *encoder_rules(r"vision_model\.encoder", "img/encoder"),
      Rule(r"vision_model\.post_layernorm\.weight", "img/encoder/norm/scale"),
      Rule(r"vision_model\.post_layernorm\.bias", "img/encoder/norm/bias"),
      Rule(r"visual_projection\.weight", "img/head/kernel", linear),
      Rule(r"text_model\.embeddings\.token_embedding\.weight", "txt/embedding/embedding"),
      Rule(r"text_model\.embeddings\.position_embedding\.weight", "txt/pos_embedding"),
      *encoder_rules(r"text_model\.encoder", "txt/encoder"),
      Rule(r"text_model\.final_layer_norm\.weight", "txt/encoder/norm/scale"),
      Rule(r"text_model\.final_layer_norm\.bias", "txt/encoder/norm/bias"),
      Rule(r"text_projection\.weight", "txt/head/kernel", linear),
  ]


def weights_file(path: str) -> str:
  for name in ("model.safetensors", "pytorch_model.bin"):
    if os.path.isfile(os.path.join(path, name)):
      return os.path.join(path, name)
  raise common.CheckpointImportError(
      f"{path}: no model.safetensors or pytorch_model.bin (sharded checkpoints: merge them "
      "first, e.g. save_pretrained(..., max_shard_size='100GB'))")


def model_type(path: str) -> str | None:
  config_path = os.path.join(path, "config.json")
  if not os.path.isdir(path) or not os.path.isfile(config_path):
    return None
  return common.read_json(config_path).get("model_type")


# model_type -> the towers such a directory holds.
MODEL_TYPES = {"clip": ("img", "txt"), "clip_vision_model": ("img",),
               "clip_text_model": ("txt",)}


def detect(path: str) -> bool:
  return model_type(path) in MODEL_TYPES


def tower(config: dict, kind: str) -> dict:
  """Tower keyword arguments from a Hugging Face vision/text sub-config."""
  act = config.get("hidden_act", "quick_gelu")
  if act not in ACTIVATIONS:
    raise common.CheckpointImportError(f"activation {act!r} is not supported")
  out = dict(width=config["hidden_size"], depth=config["num_hidden_layers"],
             mlp_dim=config["intermediate_size"], num_heads=config["num_attention_heads"],
             activation=ACTIVATIONS[act], layer_norm_eps=config.get("layer_norm_eps", 1e-5))
  if kind == "img":
    out["patch_size"] = config["patch_size"]
  else:
    out["vocab_size"] = config["vocab_size"]
  return out


def preprocessing(path: str, default_size: int) -> dict:
  """image_size / mean / std from preprocessor_config.json, where the directory has one (the
  size is the centre crop's, else the resize's: what the model sees)."""
  config_path = os.path.join(path, "preprocessor_config.json")
  out = {"image_size": default_size}
  if os.path.isfile(config_path):
    config = common.read_json(config_path)
    size = config.get("crop_size") if config.get("do_center_crop", True) else None
    size = size or config.get("size")
    if isinstance(size, dict):
      size = size.get("height") or size.get("shortest_edge")
    if isinstance(size, int) and size > 0:
      out["image_size"] = size
    if config.get("image_mean"):
      out["mean"] = tuple(config["image_mean"])
      out["std"] = tuple(config["image_std"])
  return out


def tokenizer_factory(path: str):
  """A builder of the directory's own tokenizer, if it has one."""
  names = ("tokenizer.json", "vocab.json", "tokenizer_config.json", "spiece.model")
  if not any(os.path.isfile(os.path.join(path, n)) for n in names):
    return None

  def make(max_len: int):
    from agriclip_jax.input import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
    return tokenizer_lib.from_pretrained(path, max_len)

  return make


# CLIPVisionConfig's and CLIPTextConfig's defaults: a config.json may list only what differs.
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, patch_size=32, image_size=224)
TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                     num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77)


def read(path: str) -> common.Checkpoint:
  config = common.read_json(os.path.join(path, "config.json"))
  towers = MODEL_TYPES.get(config.get("model_type"), MODEL_TYPES["clip"])
  single = config if len(towers) == 1 else {}  # A tower's fields at the top level.
  vision = {**VISION_DEFAULTS, **(config.get("vision_config") or single)}
  text = {**TEXT_DEFAULTS, **(config.get("text_config") or single)}
  params = common.convert(common.read_weights(weights_file(path)), rules(), path)
  model = {}
  if "img" in towers:
    common.fold_class_position(params, "img", num_prefix=1)
    model["img"] = dict(tower(vision, "img"), preset="clip", head="img/head/kernel" in params)
  if "txt" in towers:
    params["txt/pos_embedding"] = params["txt/pos_embedding"][None]
    model["txt"] = dict(tower(text, "txt"), preset="clip", head="txt/head/kernel" in params)
  if any(model[k]["head"] for k in model):
    model["out_dim"] = config.get("projection_dim", 512)
  if "logit_scale" in params:
    model["logit_scale_init"] = float(np.exp(params["logit_scale"]))
  return common.Checkpoint(
      FORMAT, path, params, model,
      tokenizer=tokenizer_factory(path) if "txt" in towers else None,
      context_length=text.get("max_position_embeddings", 77) if "txt" in towers else None,
      **(preprocessing(path, vision.get("image_size", 224)) if "img" in towers else {}))
