"""Hugging Face directories: `CLIPModel` (CLIP-form runs) or `SiglipModel` (SigLIP-form runs).

  transformers.CLIPModel.from_pretrained(DIR)      # or SiglipModel
  transformers.AutoTokenizer.from_pretrained(DIR)  # ids equal this project's tokenizer's

Weights are written by the importers' own tables read backwards (`common.invert`), so
`importers.read(DIR)` gives back the same parameters. The tokenizer is this project's
`tokenizer.json` with its layout made explicit (start / end of text added by the template,
padding id, maximum length), so `tokenizer(texts, padding="max_length", truncation=True)`
gives the rows this project feeds its text tower. preprocessor_config.json states the
evaluation preprocessing: the centre square, resized bilinearly, mean / std.

Which models fit: CLIP form = LayerNorm before the image encoder, class-token pooling, no
registers or LayerScale, projections without bias (or no projection where the width is the
embedding width: exported as the identity), a causal text tower pooled at the end-of-text
token. SigLIP form = attention-pooling (MAP) image head and no image projection, no pre-norm
or class token, a bidirectional text tower that attends to its padding and pools the last
position. A patch-embedding bias, which CLIP lacks, is folded into the position embedding.
"""

import copy
import os
from typing import Any

import numpy as np
import tokenizers

from agriclip_jax.input import tokenizer as tokenizer_lib
from agriclip_jax.models.exporters import common
from agriclip_jax.models.importers import hf_clip
from agriclip_jax.models.importers import hf_siglip

ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh",
               "relu": "relu"}


def form(model) -> str:
  """"siglip" for a model with a MAP image head, else "clip"."""
  return "siglip" if model.img["pool_type"] == "map" else "clip"


def _common_problems(model) -> list[str]:
  problems = []
  for kind, tower in (("image", model.img), ("text", model.txt)):
    if tower["activation"] not in ACTIVATIONS:
      problems.append(f"{kind} activation {tower['activation']!r}")
    if tower.get("layer_scale"):
      problems.append(f"LayerScale in the {kind} tower")
  if model.img.get("num_registers"):
    problems.append("register tokens")
  if isinstance(model.tokenizer.tokenizer, tokenizer_lib.SiglipSentencePiece):
    problems.append("a SentencePiece tokenizer (export writes tokenizer.json tokenizers)")
  return problems


def clip_problems(model) -> list[str]:
  img, txt = model.img, model.txt
  problems = _common_problems(model)
  if img["pool_type"] != "tok":
    problems.append(f"image pooling {img['pool_type']!r} (CLIP pools its class token)")
  if not img.get("pre_norm"):
    problems.append("no LayerNorm before the image encoder (CLIP's pre_layrnorm)")
  for kind, tower in (("image", img), ("text", txt)):
    if tower["num_classes"] and tower.get("head_bias", True):
      problems.append(f"a bias on the {kind} projection")
    if not tower["num_classes"] and tower["width"] != model.out_dim:
      problems.append(f"no {kind} projection to the {model.out_dim}-wide embedding")
  if not txt.get("causal", True):
    problems.append("a bidirectional text tower (CLIP's is causal)")
  if txt["pool_type"] != "eot":
    problems.append(f"text pooling {txt['pool_type']!r} (CLIP pools the end-of-text token)")
  tok = model.tokenizer
  if tok.eot_id == 2 and tok.eot_id != txt["vocab_size"] - 1:
    # transformers' CLIP reads eos_token_id == 2 as "pool at the highest id" (its old configs).
    problems.append("end-of-text id 2 (transformers' CLIP then pools at the highest id)")
  if model.logit_bias is not None:
    problems.append("a logit bias")
  return problems


def siglip_problems(model) -> list[str]:
  img, txt = model.img, model.txt
  problems = _common_problems(model)
  if img["num_classes"]:
    problems.append("an image projection after the attention pooling (SigLIP has none)")
  if img.get("pre_norm"):
    problems.append("a LayerNorm before the image encoder")
  if img.get("class_token"):
    problems.append("an image class token")
  if txt.get("causal", True) or txt.get("mask_padding", True):
    problems.append("a text tower that does not attend to its padding bidirectionally "
                    "(SigLIP's does)")
  if txt["pool_type"] != "last":
    problems.append(f"text pooling {txt['pool_type']!r} (SigLIP pools the last position)")
  if not txt["num_classes"] and txt["width"] != model.out_dim:
    problems.append(f"no text projection to the {model.out_dim}-wide embedding")
  return problems


def _identity_heads(params: dict, model, kinds) -> None:
  """A tower without projection whose width is the embedding width: its projection is the
  identity (and a zero bias where the format has one)."""
  for kind in kinds:
    tower = model.img if kind == "img" else model.txt
    if not tower["num_classes"]:
      params[f"{kind}/head/kernel"] = np.eye(tower["width"], dtype=np.float32)


def clip_params(model) -> dict[str, np.ndarray]:
  """Our parameters laid out as CLIP's (transformers' and open_clip's): patch bias folded into
  the positions, a class position (zero), a [length, width] text position table, projections."""
  params = dict(model.params)
  params["logit_scale"] = np.float32(model.logit_scale)
  common.fold_patch_bias(params, "img")
  common.unfold_class_position(params, "img", class_token=True)
  params["txt/pos_embedding"] = params["txt/pos_embedding"][0]
  _identity_heads(params, model, ("img", "txt"))
  return params


def clip_state(model) -> dict[str, np.ndarray]:
  return common.invert(clip_params(model), hf_clip.rules(), "hf CLIPModel")


def siglip_state(model) -> dict[str, np.ndarray]:
  params = dict(model.params)
  params["logit_scale"] = np.float32(model.logit_scale)
  params["logit_bias"] = np.float32(model.logit_bias or 0.0)
  if "img/embedding/bias" not in params:
    params["img/embedding/bias"] = np.zeros(model.img["width"], np.float32)
  common.unfold_class_position(params, "img", class_token=False)
  params["txt/pos_embedding"] = params["txt/pos_embedding"][0]
  _identity_heads(params, model, ("txt",))
  if not model.txt["num_classes"] or not model.txt.get("head_bias", True):
    params["txt/head/bias"] = np.zeros(model.out_dim, np.float32)
  state = common.invert(params, hf_siglip.rules(), "hf SiglipModel")
  for name in ("logit_scale", "logit_bias"):
    state[name] = state[name].reshape(1)  # SiglipModel's are 1-element vectors.
  return state


def _tower_config(tower: dict, kind: str) -> dict[str, Any]:
  return dict(hidden_size=tower["width"], intermediate_size=tower["mlp_dim"],
              num_hidden_layers=tower["depth"], num_attention_heads=tower["num_heads"],
              hidden_act=ACTIVATIONS[tower["activation"]],
              layer_norm_eps=tower["layer_norm_eps"],
              **({"patch_size": tower["patch_size"], "num_channels": 3} if kind == "img" else {}))


def clip_config(model) -> dict[str, Any]:
  tok = model.tokenizer
  text = dict(_tower_config(model.txt, "txt"), vocab_size=model.txt["vocab_size"],
              max_position_embeddings=tok.max_len, eos_token_id=tok.eot_id,
              bos_token_id=tok.sot_id if tok.sot_id is not None else tok.eot_id,
              pad_token_id=tok.pad_id, projection_dim=model.out_dim)
  vision = dict(_tower_config(model.img, "img"), image_size=model.image_size,
                projection_dim=model.out_dim)
  return dict(architectures=["CLIPModel"], model_type="clip", projection_dim=model.out_dim,
              logit_scale_init_value=model.logit_scale, text_config=text, vision_config=vision,
              torch_dtype="float32")


def siglip_config(model) -> dict[str, Any]:
  tok = model.tokenizer
  text = dict(_tower_config(model.txt, "txt"), vocab_size=model.txt["vocab_size"],
              max_position_embeddings=tok.max_len, projection_size=model.out_dim,
              eos_token_id=tok.eot_id, pad_token_id=tok.pad_id,
              bos_token_id=tok.sot_id if tok.sot_id is not None else tok.eot_id)
  vision = dict(_tower_config(model.img, "img"), image_size=model.image_size,
                vision_use_head=True)
  return dict(architectures=["SiglipModel"], model_type="siglip", text_config=text,
              vision_config=vision, torch_dtype="float32")


def write_tokenizer(tokenizer: tokenizer_lib.Tokenizer, out: str,
                    input_names: tuple[str, ...]) -> None:
  """tokenizer.json + tokenizer_config.json that transformers' fast tokenizer loads, giving
  this project's rows: [sot] text eot pad..., truncated to make room for the end-of-text."""
  tok = copy.deepcopy(tokenizer.tokenizer)
  name = tok.id_to_token
  eot, pad = name(tokenizer.eot_id), name(tokenizer.pad_id)
  special = [(eot, tokenizer.eot_id)]
  template = f"$A {eot}"
  if tokenizer.sot_id is not None:
    special.append((name(tokenizer.sot_id), tokenizer.sot_id))
    template = f"{name(tokenizer.sot_id)} {template}"
  tok.post_processor = tokenizers.processors.TemplateProcessing(single=template,
                                                                special_tokens=special)
  tok.enable_truncation(tokenizer.max_len)
  tok.enable_padding(pad_id=tokenizer.pad_id, pad_token=pad, length=tokenizer.max_len)
  tok.save(os.path.join(out, "tokenizer.json"))
  config = dict(tokenizer_class="PreTrainedTokenizerFast", model_max_length=tokenizer.max_len,
                eos_token=eot, pad_token=pad, padding_side="right",
                model_input_names=list(input_names), clean_up_tokenization_spaces=False)
  if tokenizer.sot_id is not None:
    config["bos_token"] = name(tokenizer.sot_id)
  common.write_json(os.path.join(out, "tokenizer_config.json"), config)
  common.write_json(os.path.join(out, "special_tokens_map.json"),
                    {k: v for k, v in config.items() if k.endswith("_token")})


def preprocessor_config(model, siglip: bool) -> dict[str, Any]:
  """Our evaluation preprocessing: the centre square, bilinear resize (PIL 2), mean / std."""
  size = model.image_size
  base = dict(do_resize=True, resample=2, do_rescale=True, rescale_factor=1 / 255,
              do_normalize=True, image_mean=list(model.mean), image_std=list(model.std),
              do_convert_rgb=True)
  if siglip:  # SiglipImageProcessor resizes to the square without cropping: crop first.
    return dict(base, image_processor_type="SiglipImageProcessor",
                size={"height": size, "width": size})
  return dict(base, image_processor_type="CLIPImageProcessor",
              size={"shortest_edge": size}, do_center_crop=True,
              crop_size={"height": size, "width": size})


def export(model, out: str) -> dict[str, Any]:
  siglip = form(model) == "siglip"
  problems = (siglip_problems if siglip else clip_problems)(model)
  if problems:
    raise common.Unexpressible(f"transformers' {'SiglipModel' if siglip else 'CLIPModel'}",
                               problems)
  state = (siglip_state if siglip else clip_state)(model)
  os.makedirs(out, exist_ok=True)
  common.write_safetensors(os.path.join(out, "model.safetensors"), state)
  common.write_json(os.path.join(out, "config.json"),
                    (siglip_config if siglip else clip_config)(model))
  # SigLIP's text tower attends to its padding: no attention mask may reach it.
  write_tokenizer(model.tokenizer, out,
                  ("input_ids",) if siglip else ("input_ids", "attention_mask"))
  common.write_json(os.path.join(out, "preprocessor_config.json"),
                    preprocessor_config(model, siglip))
  cls = "SiglipModel" if siglip else "CLIPModel"
  return {"format": "hf", "architecture": cls, "out": out,
          "load": f"transformers.{cls}.from_pretrained({out!r}); "
                  f"transformers.AutoTokenizer.from_pretrained({out!r})"}
