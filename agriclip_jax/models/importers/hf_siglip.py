"""Hugging Face `SiglipModel` directories: config.json + model.safetensors (or
pytorch_model.bin), SigLIP's SentencePiece tokenizer (spiece.model) and
preprocessor_config.json.

Google's SigLIP (e.g. google/siglip-base-patch16-224, google/siglip-so400m-patch14-384) is
published this way, and so are SigLIP 2's fixed-resolution checkpoints. Both towers, the image
tower's attention-pooling (MAP) head, the text head, the logit scale and the logit bias are
read. SigLIP 2's NaFlex checkpoints (model_type "siglip2") are a different model (patches of
variable aspect, resized position grid) and are refused.
"""

import os

import numpy as np

from agriclip_jax.models.importers import common
from agriclip_jax.models.importers import hf_clip
from agriclip_jax.models.importers.common import Rule, linear, conv, split_qkv

FORMAT = "hf_siglip"

MAP = "img/map_head"

# SiglipConfig's defaults: published config.json files list only the values that differ.
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, image_size=224, patch_size=16,
                       hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=True)
TEXT_DEFAULTS = dict(vocab_size=32000, hidden_size=768, intermediate_size=3072,
                     num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=64,
                     hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)


def rules() -> list[Rule]:
  return [
      Rule(r"logit_scale", "logit_scale"),
      Rule(r"logit_bias", "logit_bias"),
      Rule(r"(text|vision)_model\.embeddings\.position_ids", None),  # A buffer, not weights.
      Rule(r"vision_model\.embeddings\.patch_embedding\.weight", "img/embedding/kernel", conv),
      Rule(r"vision_model\.embeddings\.patch_embedding\.bias", "img/embedding/bias"),
      Rule(r"vision_model\.embeddings\.position_embedding\.weight", "img/pos_embedding"),
      *hf_clip.encoder_rules(r"vision_model\.encoder", "img/encoder"),
      Rule(r"vision_model\.post_layernorm\.weight", "img/encoder/norm/scale"),
      Rule(r"vision_model\.post_layernorm\.bias", "img/encoder/norm/bias"),
      # The MAP head: torch's nn.MultiheadAttention fuses q, k and v in one projection.
      Rule(r"vision_model\.head\.probe", f"{MAP}/probe"),
      Rule(r"vision_model\.head\.attention\.in_proj_weight",
           tuple(f"{MAP}/attn/{n}/kernel" for n in ("query", "key", "value")), split_qkv),
      Rule(r"vision_model\.head\.attention\.in_proj_bias",
           tuple(f"{MAP}/attn/{n}/bias" for n in ("query", "key", "value")), split_qkv),
      Rule(r"vision_model\.head\.attention\.out_proj\.weight", f"{MAP}/attn/out/kernel", linear),
      Rule(r"vision_model\.head\.attention\.out_proj\.bias", f"{MAP}/attn/out/bias"),
      Rule(r"vision_model\.head\.layernorm\.weight", f"{MAP}/norm/scale"),
      Rule(r"vision_model\.head\.layernorm\.bias", f"{MAP}/norm/bias"),
      Rule(r"vision_model\.head\.mlp\.(?P<fc>fc[12])\.weight", MAP + "/mlp/{fc}/kernel", linear),
      Rule(r"vision_model\.head\.mlp\.(?P<fc>fc[12])\.bias", MAP + "/mlp/{fc}/bias"),
      Rule(r"text_model\.embeddings\.token_embedding\.weight", "txt/embedding/embedding"),
      Rule(r"text_model\.embeddings\.position_embedding\.weight", "txt/pos_embedding"),
      *hf_clip.encoder_rules(r"text_model\.encoder", "txt/encoder"),
      Rule(r"text_model\.final_layer_norm\.weight", "txt/encoder/norm/scale"),
      Rule(r"text_model\.final_layer_norm\.bias", "txt/encoder/norm/bias"),
      Rule(r"text_model\.head\.weight", "txt/head/kernel", linear),
      Rule(r"text_model\.head\.bias", "txt/head/bias"),
  ]


def detect(path: str) -> bool:
  return hf_clip.model_type(path) in ("siglip", "siglip2")


def towers(path: str, config: dict) -> tuple[dict, dict]:
  """The vision and text sub-configs with SigLIP's defaults filled in; refuses, in one line,
  the SigLIP variants this layout cannot hold."""
  if config.get("model_type") == "siglip2":
    raise common.CheckpointImportError(
        f"{path}: SigLIP 2 NaFlex checkpoints (model_type 'siglip2') are not supported; use a "
        "fixed-resolution SigLIP 2 checkpoint (model_type 'siglip'), which this reads")
  vision = {**VISION_DEFAULTS, **(config.get("vision_config") or {})}
  text = {**TEXT_DEFAULTS, **(config.get("text_config") or {})}
  if not vision.get("vision_use_head", True):
    raise common.CheckpointImportError(
        f"{path}: a SigLIP vision tower without its attention-pooling head has no image "
        "embedding")
  # SiglipModel compares the MAP output (vision width) with the text head's output.
  projection = text.get("projection_size") or text["hidden_size"]
  if projection != vision["hidden_size"]:
    raise common.CheckpointImportError(
        f"{path}: text projection_size {projection} differs from the vision width "
        f"{vision['hidden_size']}, so its embeddings cannot be compared")
  return vision, text


def read(path: str) -> common.Checkpoint:
  config = common.read_json(os.path.join(path, "config.json"))
  vision, text = towers(path, config)
  params = common.convert(common.read_weights(hf_clip.weights_file(path)), rules(), path)
  common.fold_class_position(params, "img", num_prefix=0)
  params["txt/pos_embedding"] = params["txt/pos_embedding"][None]
  scale = float(np.exp(np.asarray(params["logit_scale"], np.float64).reshape(())))
  model = dict(
      # Image embedding = the MAP head's output (no projection); text head to that width.
      img=dict(hf_clip.tower(vision, "img"), preset="siglip", head=False),
      txt=dict(hf_clip.tower(text, "txt"), preset="siglip", head=True),
      out_dim=vision["hidden_size"],
      logit_scale_init=scale,
      logit_bias_init=float(np.asarray(params["logit_bias"]).reshape(())),
  )
  if scale > 100.0:  # Trained SigLIPs exceed the default cap (e.g. 117): keep their scale.
    model["max_logit_scale"] = float(np.ceil(scale))
  return common.Checkpoint(
      FORMAT, path, params, model, tokenizer=hf_clip.tokenizer_factory(path),
      context_length=text["max_position_embeddings"],
      **preprocessing(path, vision["image_size"]))


def preprocessing(path: str, default_size: int) -> dict:
  """SigLIP normalises with mean = std = 0.5 where its preprocessor config says nothing."""
  return {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
          **hf_clip.preprocessing(path, default_size)}
