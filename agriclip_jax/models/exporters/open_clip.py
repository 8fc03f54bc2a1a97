"""open_clip directories: open_clip_config.json + open_clip_model.safetensors + tokenizer.

  model, _, preprocess = open_clip.create_model_and_transforms("local-dir:DIR")
  tokenizer = open_clip.get_tokenizer("local-dir:DIR")

The config names a Hugging Face tokenizer (`hf_tokenizer_name`), which open_clip reads from
the directory itself for `local-dir:` models: this project's tokenizer.json, written as the
`hf` export writes it. open_clip's tokenizer first collapses runs of whitespace (its
`clean="whitespace"`); for texts without such runs the ids equal this project's.

Expressible: open_clip's ViT (a class token that attends; class-token or average pooling
over the patches, LayerNorm before the encoder or not, LayerScale) and text transformer
(causal or bidirectional attending to padding; pooled at the end-of-text token, first or last
position; projection with or without bias), one activation for both towers when it is
QuickGELU, any LayerNorm epsilon, a logit bias. Not: attention pooling (MAP), registers, an
image tower without class token, an image projection bias. A patch-embedding bias is folded
into the position embedding.
"""

import os
from typing import Any

import numpy as np

from agriclip_jax.models.exporters import common
from agriclip_jax.models.exporters import hf
from agriclip_jax.models.importers import open_clip as importer

TEXT_POOLING = {"eot": "eos", "first": "first", "last": "last"}
WEIGHTS = "open_clip_model.safetensors"


def problems(model) -> list[str]:
  img, txt = model.img, model.txt
  out = []
  if img["pool_type"] not in ("tok", "gap"):
    out.append(f"image pooling {img['pool_type']!r} (open_clip pools its class token or "
               "averages)")
  elif not (img.get("class_token") or (img.get("class_token") is None
                                        and img["pool_type"] == "tok")):
    out.append("an image tower without class token (open_clip's always has one, which "
               "takes part in attention)")
  if img.get("num_registers"):
    out.append("register tokens")
  if img["num_classes"] and img.get("head_bias", True):
    out.append("a bias on the image projection")
  for kind, tower in (("image", img), ("text", txt)):
    if not tower["num_classes"] and tower["width"] != model.out_dim:
      out.append(f"no {kind} projection to the {model.out_dim}-wide embedding")
    if tower["activation"] not in ("gelu", "gelu_tanh", "quick_gelu"):
      out.append(f"{kind} activation {tower['activation']!r}")
    if int(tower["width"] * (tower["mlp_dim"] / tower["width"])) != tower["mlp_dim"]:
      out.append(f"{kind} MLP width {tower['mlp_dim']} (not width * a ratio open_clip rounds "
                 "back)")
  if (img["activation"] == "quick_gelu") != (txt["activation"] == "quick_gelu"):
    out.append("QuickGELU in one tower only (open_clip's quick_gelu is for both)")
  if img["width"] % img["num_heads"]:
    out.append("image heads that do not divide the width")
  if txt.get("layer_scale"):
    out.append("LayerScale in the text tower")
  if txt["pool_type"] not in TEXT_POOLING:
    out.append(f"text pooling {txt['pool_type']!r}")
  if not txt.get("causal", True) and txt.get("mask_padding", True):
    out.append("a bidirectional text tower that masks its padding (open_clip's attends to it)")
  return out


def state(model) -> dict[str, np.ndarray]:
  params = hf.clip_params(model)
  biased = model.txt["num_classes"] and model.txt.get("head_bias", True)
  # The text projection is a [width, embed] Parameter, or an nn.Linear where it has a bias.
  rules = [r for r in importer.rules()
           if r.source != (r"text_projection" if biased else r"text_projection\.weight")]
  out = common.invert(params, rules, "open_clip CLIP")
  if model.logit_bias is not None:
    out["logit_bias"] = np.asarray(model.logit_bias, np.float32).reshape(())
  out["logit_scale"] = out["logit_scale"].reshape(())
  return out


def _tower_extras(tower: dict) -> dict[str, Any]:
  extras = {"norm_kwargs": {"eps": tower["layer_norm_eps"]}}
  if tower["activation"] == "gelu_tanh":
    extras["act_kwargs"] = {"approximate": "tanh"}
  return extras


def config(model) -> dict[str, Any]:
  img, txt, tok = model.img, model.txt, model.tokenizer
  vision = dict(layers=img["depth"], width=img["width"],
                head_width=img["width"] // img["num_heads"],
                mlp_ratio=img["mlp_dim"] / img["width"], patch_size=img["patch_size"],
                image_size=model.image_size, no_ln_pre=not img.get("pre_norm"),
                pool_type="tok" if img["pool_type"] == "tok" else "avg",
                **_tower_extras(img))
  if img.get("layer_scale"):
    vision["ls_init_value"] = float(img["layer_scale"])
  text = dict(context_length=tok.max_len, vocab_size=txt["vocab_size"], width=txt["width"],
              heads=txt["num_heads"], layers=txt["depth"],
              mlp_ratio=txt["mlp_dim"] / txt["width"],
              no_causal_mask=not txt.get("causal", True),
              pool_type=TEXT_POOLING[txt["pool_type"]], eos_id=tok.eot_id, pad_id=tok.pad_id,
              proj_bias=bool(txt["num_classes"] and txt.get("head_bias", True)),
              hf_tokenizer_name="agriclip_jax-export", tokenizer_kwargs={"clean": "whitespace"},
              **_tower_extras(txt))
  model_cfg = dict(embed_dim=model.out_dim, vision_cfg=vision, text_cfg=text,
                   quick_gelu=img["activation"] == "quick_gelu")
  if model.logit_bias is not None:
    model_cfg["init_logit_bias"] = model.logit_bias
  preprocess = dict(size=model.image_size, mode="RGB", mean=list(model.mean),
                    std=list(model.std), interpolation="bilinear", resize_mode="shortest")
  return {"model_cfg": model_cfg, "preprocess_cfg": preprocess}


def export(model, out: str) -> dict[str, Any]:
  found = problems(model)
  if found:
    raise common.Unexpressible("open_clip", found)
  weights = state(model)
  os.makedirs(out, exist_ok=True)
  common.write_safetensors(os.path.join(out, WEIGHTS), weights)
  common.write_json(os.path.join(out, importer.CONFIG_NAME), config(model))
  hf.write_tokenizer(model.tokenizer, out, ("input_ids", "attention_mask"))
  return {"format": "open_clip", "out": out,
          "load": f"open_clip.create_model_and_transforms('local-dir:{out}'); "
                  f"open_clip.get_tokenizer('local-dir:{out}')"}
