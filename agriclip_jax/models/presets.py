"""Named tower families: `model.img.preset = "clip"` sets what that family's checkpoints need.

A preset fills the tower's keyword arguments before `variant` and explicit overrides, so
`dict(preset="clip", variant="B/16")` is OpenAI's CLIP ViT-B/16 image tower. The importers
describe the checkpoints they read in these terms.
"""

from agriclip_jax import config_lib

IMAGE = {
    # OpenAI CLIP and open_clip's ViTs: LayerNorm before the encoder, class-token pooling,
    # no bias on the patch embedding or the projection.
    "clip": dict(pool_type="tok", pre_norm=True, activation="quick_gelu", layer_norm_eps=1e-5,
                 patch_bias=False, head_bias=False),
    "open_clip": dict(pool_type="tok", pre_norm=True, activation="gelu", layer_norm_eps=1e-5,
                      patch_bias=False, head_bias=False),
    # SigLIP: attention pooling (MAP), tanh GELU, no projection.
    "siglip": dict(pool_type="map", activation="gelu_tanh", layer_norm_eps=1e-6, head=False),
    # timm / AugReg / big_vision and DINO ViTs: class-token pooling after the final norm.
    "timm": dict(pool_type="tok", activation="gelu", layer_norm_eps=1e-6),
    "dino": dict(pool_type="tok", activation="gelu", layer_norm_eps=1e-6, head=False),
    # Hugging Face's ViTModel (google/vit-*, facebook/dino-vit*): the same, LayerNorm eps 1e-12.
    "hf_vit": dict(pool_type="tok", activation="gelu", layer_norm_eps=1e-12, head=False),
    "dinov2": dict(pool_type="tok", activation="gelu", layer_norm_eps=1e-6, layer_scale=1e-5,
                   head=False),
}

TEXT = {
    # Causal, pooled at the end-of-text token, projection without bias.
    "clip": dict(causal=True, pool_type="eot", activation="quick_gelu", layer_norm_eps=1e-5,
                 head_bias=False),
    "open_clip": dict(causal=True, pool_type="eot", activation="gelu", layer_norm_eps=1e-5,
                      head_bias=False),
    # Bidirectional over the padded row (padding attended to, as trained), last token, biased head.
    "siglip": dict(causal=False, mask_padding=False, pool_type="last", activation="gelu_tanh",
                   layer_norm_eps=1e-6),
}


# The image normalisation (mean, std) each family's checkpoints were trained with.
NORMALIZATION = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "timm": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # AugReg / in21k; ImageNet-1k-only use ImageNet's.
    "hf_vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # google/vit-*; facebook/dino-vit*: ImageNet's.
    "dino": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
NORMALIZATION.update(open_clip=NORMALIZATION["clip"], dinov2=NORMALIZATION["dino"])


def normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
  if name not in NORMALIZATION:
    raise config_lib.ConfigError(f"unknown tower family {name!r}; one of {sorted(NORMALIZATION)}")
  return NORMALIZATION[name]


def get(name: str, kind: str) -> dict:
  table = IMAGE if kind == "img" else TEXT
  if name not in table:
    raise config_lib.ConfigError(f"model.{kind}.preset={name!r} is not one of {sorted(table)}")
  return dict(table[name])
