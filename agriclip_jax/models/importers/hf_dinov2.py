"""Hugging Face DINOv2 directories: `Dinov2Model` (model_type "dinov2", facebook/dinov2-*) and
`Dinov2WithRegistersModel` ("dinov2_with_registers", facebook/dinov2-with-registers-*):
config.json + model.safetensors (or pytorch_model.bin).

The image tower maps onto `vit.Model` with the "dinov2" preset: a class token, then the register
tokens (no position embedding on them), LayerScale on both residual branches, exact GELU, and
class-token pooling after the final LayerNorm (HF's `pooler_output` is
`layernorm(last_hidden_state)[:, 0]`). A classification directory (`Dinov2ForImageClassification`)
reads as its backbone: its head takes [class token, mean of patches], a form our tower has not.
The SwiGLU MLP of ViT-g/14 (`mlp.weights_in/weights_out`) is refused.

Position embeddings at another resolution. HF resamples the [1 + N, w] table at run time with
PyTorch's bicubic `interpolate(size=grid)` (align_corners=False); this version of transformers no
longer uses the original repository's `scale_factor` with its +0.1 offset. For `Dinov2Model`
that is exactly `resample.resample_grid`. `Dinov2WithRegistersModel` passes `antialias=True`, as
the original registers models do, which is a different kernel even when enlarging: Keys' cubic
with a = -0.5 (PIL's) instead of -0.75, taps outside the grid dropped and the rest renormalised
instead of clamped to the edge, and the kernel widened by the ratio when shrinking.
`resample.antialiased_resample_grid` computes those weights, so both families resampled at
import equal HF's output at the new resolution.
"""

import os
import re

from agriclip_jax.models.importers import common
from agriclip_jax.models.importers import hf_clip
from agriclip_jax.models.importers import hf_vit
from agriclip_jax.models.importers import resample
from agriclip_jax.models.importers.common import Rule, linear

FORMAT = "hf_dinov2"
MODEL_TYPES = ("dinov2", "dinov2_with_registers")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Where a classification directory keeps the backbone; the SwiGLU MLP's keys (ViT-g/14).
PREFIXES = ("dinov2.", "dinov2_with_registers.")
SWIGLU = re.compile(r".*\.mlp\.(weights_in|weights_out|gate_proj|up_proj|down_proj)\..*")


def rules() -> list[Rule]:
  block, out = hf_vit.BLOCK, hf_vit.OUT
  return [
      *hf_vit.shared_rules(),
      Rule(r"embeddings\.register_tokens", "img/registers"),
      Rule(block + r"layer_scale(?P<n>[12])\.lambda1", out + "ls{n}/gamma"),
      Rule(block + r"norm(?P<n>[12])\.weight", out + "norm{n}/scale"),
      Rule(block + r"norm(?P<n>[12])\.bias", out + "norm{n}/bias"),
      Rule(block + r"mlp\.(?P<fc>fc[12])\.weight", out + "mlp/{fc}/kernel", linear),
      Rule(block + r"mlp\.(?P<fc>fc[12])\.bias", out + "mlp/{fc}/bias"),
      Rule(r"classifier\..*", None),  # Linear on [cls, mean of patches]: no such head here.
  ]


def detect(path: str) -> bool:
  return hf_clip.model_type(path) in MODEL_TYPES


def tower(config: dict) -> dict:
  """`model.img` keyword arguments from a Hugging Face DINOv2 config."""
  act = config.get("hidden_act", "gelu")
  if act not in hf_clip.ACTIVATIONS:
    raise common.CheckpointImportError(f"activation {act!r} is not supported")
  width = config["hidden_size"]
  out = dict(preset="dinov2", width=width, depth=config["num_hidden_layers"],
             mlp_dim=int(width * config.get("mlp_ratio", 4)),
             num_heads=config["num_attention_heads"],
             patch_size=hf_vit.square(config.get("patch_size", 14), "patch_size"),
             activation=hf_clip.ACTIVATIONS[act],
             layer_norm_eps=config.get("layer_norm_eps", 1e-6))
  if config.get("num_register_tokens"):
    out["num_registers"] = int(config["num_register_tokens"])
  return out


def read(path: str) -> common.Checkpoint:
  config = common.read_json(os.path.join(path, "config.json"))
  state = common.strip_prefixes(common.read_weights(hf_clip.weights_file(path)), PREFIXES)
  swiglu = sorted(k for k in state if SWIGLU.fullmatch(k))
  if swiglu or config.get("use_swiglu_ffn"):
    raise common.CheckpointImportError(
        f"{path}: the SwiGLU MLP of DINOv2 ViT-g/14 (use_swiglu_ffn, "
        f"{swiglu[0] if swiglu else 'mlp.weights_in'}) is not supported; use ViT-S/B/L")
  params = common.convert(state, rules(), path)
  common.fold_class_position(params, "img", num_prefix=1)
  img = tower(config)
  if not config.get("qkv_bias", True):
    hf_vit.zero_qkv_biases(params, img["depth"], img["width"])
  size = hf_vit.square(config.get("image_size", 518), "image_size")
  prep = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, **hf_clip.preprocessing(path, size)}
  registers = config.get("model_type") == "dinov2_with_registers"
  return common.Checkpoint(FORMAT, path, params, dict(img=img),
                           resample=resample.antialiased_resample_grid if registers else None,
                           **prep)
