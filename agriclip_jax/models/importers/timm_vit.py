"""timm `VisionTransformer` checkpoints: a Hugging Face hub directory as timm publishes it
(config.json + model.safetensors or pytorch_model.bin), or a bare .safetensors / .bin / .pth
state dict in timm's key layout.

LiT for species locks `vit_large_patch16_384.augreg_in21k_ft_in1k` (ImageNet-21k AugReg,
fine-tuned on ImageNet-1k at 384 px): class-token pooling after the final LayerNorm, exact GELU,
LayerNorm eps 1e-6, and a 1000-class head, which is kept in `Checkpoint.optional` (`img/head`)
and loaded only when asked for. The same table reads DINO's ViTs (`dino.py` imports it) and
DINOv2's original .pth files (`mask_token` dropped, `ls1/ls2.gamma` LayerScale).

Width, depth, MLP width and patch size come from the weights; the number of heads cannot, so
it comes from config.json's `model_args`, else from the architecture's size word
(`vit_<size>_patch<p>_<res>`), else width // 64 with a warning. Read as well: register tokens
(`reg_token`; their positions, if the table has them, are added into them as the class token's
into `cls`), `norm_pre` (CLIP-style pre-norm, patch embedding without bias), LayerScale, MAP
pooling (`attn_pool`), attention without q/k/v or output bias (zero biases, an exact
equivalent). Refused in one line: `fc_norm` (global-average pooling followed by a LayerNorm;
our tower normalises before pooling), no final norm, avgmax/max pooling, `pool_include_prefix`,
QK-norm and other extra norms (reported as keys without a conversion rule).

Resampling the position grid to another image size uses timm's own kernel: bicubic with
`antialias=True` (`checkpoint_filter_fn` and `dynamic_img_size` both resize that way), which is
PIL's cubic (a = -0.5) with renormalised edge taps, not PyTorch's plain bicubic.
"""

import json
import os
import pickletools
import re
import zipfile
from typing import Any, Mapping

from absl import logging
import numpy as np

from agriclip_jax.models.importers import common
from agriclip_jax.models.importers import resample
from agriclip_jax.models.importers.common import Rule, conv, linear, split_qkv

FORMAT = "timm"

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
EXTENSIONS = (".safetensors", ".bin", ".pth", ".pt", ".tar")
# Keys every timm ViT state dict has (without prefixes).
REQUIRED = ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# timm's size words -> number of heads (their widths are checked against the weights).
HEADS = {"tiny": (192, 3), "small": (384, 6), "medium": (512, 8), "mediumd": (512, 8),
         "base": (768, 12), "betwixt": (640, 10), "large": (1024, 16), "huge": (1280, 16),
         "giant": (1408, 16), "gigantic": (1664, 16), "so400m": (1152, 16),
         "so150m": (896, 14), "wee": (256, 4), "pwee": (256, 4), "little": (320, 5)}
POOLS = {"token": "tok", "avg": "gap", "map": "map"}


def _split_kv(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """timm's fused key/value projection of MAP pooling ([2w, w] or [2w]) -> k, v."""
  return tuple(linear(part) for part in np.split(x, 2, axis=0))


def _linear_rules(source: str, target: str) -> list[Rule]:
  return [Rule(source + r"\.weight", target + "/kernel", linear),
          Rule(source + r"\.bias", target + "/bias")]


def _norm_rules(source: str, target: str) -> list[Rule]:
  return [Rule(source + r"\.weight", target + "/scale"), Rule(source + r"\.bias", target + "/bias")]


def rules() -> list[Rule]:
  """timm's ViT keys -> this project's `img/...` paths (DINO's checkpoints use it too)."""
  block = r"blocks\.(?P<block>\d+)\."
  out = "img/encoder/{block}/"
  qkv = lambda kind: tuple(out + f"attn/{name}/{kind}" for name in ("query", "key", "value"))
  pool = "img/map_head/"
  return [
      Rule(r"cls_token", "img/cls"),
      Rule(r"reg_token", "img/registers"),
      Rule(r"pos_embed", "img/pos_embedding"),
      Rule(r"mask_token", None),  # DINOv2 / iBOT: replaces masked patches in training only.
      Rule(r"patch_embed\.proj\.weight", "img/embedding/kernel", conv),
      Rule(r"patch_embed\.proj\.bias", "img/embedding/bias"),
      *_norm_rules(r"norm_pre", "img/pre_norm"),
      *_norm_rules(block + r"norm(?P<n>[12])", out + "norm{n}"),
      Rule(block + r"attn\.qkv\.weight", qkv("kernel"), split_qkv),
      Rule(block + r"attn\.qkv\.bias", qkv("bias"), split_qkv),
      *_linear_rules(block + r"attn\.proj", out + "attn/out"),
      Rule(block + r"ls(?P<n>[12])\.gamma", out + "ls{n}/gamma"),
      *_linear_rules(block + r"mlp\.(?P<fc>fc[12])", out + "mlp/{fc}"),
      *_norm_rules(r"norm", "img/encoder/norm"),
      Rule(r"attn_pool\.latent", pool + "probe"),
      *_linear_rules(r"attn_pool\.q", pool + "attn/query"),
      Rule(r"attn_pool\.kv\.weight", (pool + "attn/key/kernel", pool + "attn/value/kernel"),
           _split_kv),
      Rule(r"attn_pool\.kv\.bias", (pool + "attn/key/bias", pool + "attn/value/bias"), _split_kv),
      *_linear_rules(r"attn_pool\.proj", pool + "attn/out"),
      *_norm_rules(r"attn_pool\.norm", pool + "norm"),
      *_linear_rules(r"attn_pool\.mlp\.(?P<fc>fc[12])", pool + "mlp/{fc}"),
      *_linear_rules(r"head", "img/head"),
  ]


# ------------------------------------------------------------------------------ detection

def _pickle_strings(path: str) -> set[str] | None:
  """The strings of a torch zip checkpoint's pickle (its keys among them), found by reading
  the opcodes without executing any: cheap even for a large file. None if not a torch zip."""
  if not zipfile.is_zipfile(path):
    return None
  with zipfile.ZipFile(path) as archive:
    names = [n for n in archive.namelist() if n.endswith("data.pkl")]
    if not names:
      return None
    data = archive.read(names[0])
  try:
    return {arg for _, arg, _ in pickletools.genops(data) if isinstance(arg, str)}
  except ValueError:
    return None


def peek_keys(path: str) -> set[str]:
  """Key names of a weights file without loading its tensors where the format allows (a
  safetensors header, a torch zip's pickle); a nested checkpoint yields its inner keys too."""
  try:
    if path.endswith(".safetensors"):
      with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        return set(json.loads(f.read(min(header_len, 100 * 2**20))))
    strings = _pickle_strings(path)
    if strings is not None:
      return strings
    return set(_flat_keys(common.read_torch(path)))
  except (OSError, ValueError, zipfile.BadZipFile, common.CheckpointImportError):
    return set()


def _flat_keys(tree: Any) -> list[str]:
  if not isinstance(tree, Mapping):
    return []
  return [k for k in tree if isinstance(k, str)] + [
      key for v in tree.values() for key in _flat_keys(v)]


def looks_like_vit(keys: set[str]) -> bool:
  return all(key in keys for key in REQUIRED)


def _weights_file(path: str) -> str | None:
  for name in WEIGHT_FILES:
    if os.path.isfile(os.path.join(path, name)):
      return os.path.join(path, name)
  return None


def _timm_config(path: str) -> dict[str, Any] | None:
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    return None
  config = common.read_json(config_path)
  return config if "architecture" in config else None


def detect(path: str) -> bool:
  if os.path.isdir(path):
    weights = _weights_file(path)
    return bool(_timm_config(path) and weights and looks_like_vit(peek_keys(weights)))
  return path.endswith(EXTENSIONS) and looks_like_vit(peek_keys(path))


# ---------------------------------------------------------------------------- architecture

def _heads_known(width: int, config: dict) -> bool:
  """Whether config.json states the head count (model_args, or a named architecture)."""
  match = re.match(r"vit_([a-z0-9]+)_patch", config.get("architecture", ""))
  return bool(config.get("model_args", {}).get("num_heads")
              or (match and HEADS.get(match.group(1), (None,))[0] == width))


def _num_heads(width: int, config: dict, source: str) -> int:
  if config.get("model_args", {}).get("num_heads"):
    return int(config["model_args"]["num_heads"])
  match = re.match(r"vit_([a-z0-9]+)_patch", config.get("architecture", ""))
  if match and HEADS.get(match.group(1), (None,))[0] == width:
    return HEADS[match.group(1)][1]
  logging.warning("%s: the number of attention heads is not in the file; assuming width // 64 "
                  "= %d (set model.img.num_heads if that is wrong)", source, width // 64)
  return max(width // 64, 1)


def _pool_type(state: Mapping[str, np.ndarray], config: dict, source: str) -> str:
  args = config.get("model_args", {})
  pool = args.get("global_pool") or config.get("global_pool")
  if pool is None:
    pool = "map" if "attn_pool.latent" in state else "token" if "cls_token" in state else "avg"
  if "fc_norm.weight" in state:
    raise common.CheckpointImportError(
        f"{source}: fc_norm (a LayerNorm after {pool!r} pooling, in place of the final norm) "
        "cannot be expressed: this ViT normalises the tokens before pooling")
  if "norm.weight" not in state:
    raise common.CheckpointImportError(f"{source}: no final norm (norm.weight); this ViT "
                                       "always ends with one")
  if args.get("pool_include_prefix"):
    raise common.CheckpointImportError(f"{source}: pool_include_prefix is not supported (this "
                                       "ViT pools over the patches only)")
  if pool not in POOLS:
    raise common.CheckpointImportError(
        f"{source}: global_pool={pool!r} is not supported (only {', '.join(POOLS)})")
  return POOLS[pool]


def _activation_and_eps(config: dict) -> tuple[str, float]:
  """What timm runs for the architecture: `model_args.act_layer` where config.json has it; CLIP
  towers use LayerNorm eps 1e-5 and, only in the `*_quickgelu` variants, QuickGELU; others
  timm's default, exact GELU and eps 1e-6."""
  name = config.get("architecture", "")
  args = config.get("model_args", {})
  if "siglip" in name and not args.get("act_layer"):
    logging.warning("%s: timm's SigLIP towers differ in activation (exact or tanh GELU) and "
                    "config.json does not say; assuming exact GELU", name)
  activation = args.get("act_layer") or ("quick_gelu" if "quickgelu" in name else "gelu")
  activation = {"gelu_tanh": "gelu_tanh", "quick_gelu": "quick_gelu", "gelu": "gelu"}.get(
      activation)
  if activation is None:
    raise common.CheckpointImportError(f"activation {args.get('act_layer')!r} is not supported")
  eps = 1e-5 if "_clip" in name and "siglip" not in name else 1e-6
  return activation, eps


def architecture(state: Mapping[str, np.ndarray], config: dict, source: str) -> dict[str, Any]:
  """`config.model.img` of a timm ViT state dict (config: timm's config.json, maybe empty)."""
  if "pos_embed" not in state:
    raise common.CheckpointImportError(f"{source}: no pos_embed (a ViT without learned position "
                                       "embeddings); not supported")
  kernel = state["patch_embed.proj.weight"]
  if kernel.ndim != 4 or kernel.shape[2] != kernel.shape[3]:
    raise common.CheckpointImportError(f"{source}: patch_embed.proj.weight is "
                                       f"{tuple(kernel.shape)}, not a square conv kernel")
  width = int(kernel.shape[0])
  depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
  activation, eps = _activation_and_eps(config)
  return dict(
      preset="timm", width=width, depth=depth,
      mlp_dim=int(state["blocks.0.mlp.fc1.weight"].shape[0]),
      num_heads=_num_heads(width, config, source), patch_size=int(kernel.shape[2]),
      pool_type=_pool_type(state, config, source), class_token="cls_token" in state,
      num_registers=int(state["reg_token"].shape[1]) if "reg_token" in state else 0,
      pre_norm="norm_pre.weight" in state, patch_bias="patch_embed.proj.bias" in state,
      layer_scale=1e-5 if "blocks.0.ls1.gamma" in state else None,
      activation=activation, layer_norm_eps=eps, head=False)


def add_missing_biases(params: dict[str, np.ndarray]) -> None:
  """Attention without q/k/v or output bias (timm's qkv_bias / proj_bias = False) is attention
  with zero biases, which our layer always has."""
  for kernel in [k for k in params if re.search(r"/attn/(query|key|value|out)/kernel$", k)]:
    bias = kernel[:-len("kernel")] + "bias"
    if bias not in params:
      width = params[kernel].shape[-1]  # [in, out] after the transpose, out = width.
      params[bias] = np.zeros((width,), params[kernel].dtype)


def fold_prefix_positions(params: dict[str, np.ndarray], img: dict, num_patches: int) -> None:
  """timm's [1, L, w] position table -> our grid. If it has entries for the prefix tokens
  (L > grid), the class token's is added into `cls` and the registers' into `registers`."""
  pos = params["img/pos_embedding"].reshape(-1, params["img/pos_embedding"].shape[-1])
  embedded = pos.shape[0] - num_patches
  if embedded not in (0, int(img["class_token"]) + img["num_registers"]):
    raise common.CheckpointImportError(
        f"img/pos_embedding: {pos.shape[0]} positions for {num_patches} patches and "
        f"{int(img['class_token']) + img['num_registers']} prefix tokens")
  if embedded and img["num_registers"]:
    first = int(img["class_token"])
    params["img/registers"] = params["img/registers"] + pos[None, first:embedded]
  common.fold_class_position(params, "img", embedded, "cls" if img["class_token"] else None)


def grid_tokens(pos_len: int, img: dict, image_size: int | None) -> int:
  """Patches in the position table: the square count with or without the prefix tokens'
  entries (timm's `no_embed_class`); the image size decides if both are squares."""
  num_prefix = int(img["class_token"]) + img["num_registers"]
  squares = [t for t in dict.fromkeys((pos_len - num_prefix, pos_len))
             if t > 0 and int(round(np.sqrt(t))) ** 2 == t]
  if image_size and (image_size // img["patch_size"]) ** 2 in squares:
    return (image_size // img["patch_size"]) ** 2
  return squares[0] if squares else pos_len


def from_state(state: Mapping[str, np.ndarray], config: dict, path: str, format_name: str,
               mean=IMAGENET_MEAN, std=IMAGENET_STD) -> common.Checkpoint:
  """A Checkpoint from a timm-layout ViT state dict (no prefixes); the classifier head goes to
  `optional`."""
  img = architecture(state, config, path)
  params = common.convert(state, rules(), path)
  add_missing_biases(params)
  cfg = config.get("pretrained_cfg", {})
  image_size = (cfg.get("input_size") or [None])[-1]
  fold_prefix_positions(params, img, grid_tokens(
      params["img/pos_embedding"].shape[-2], img, image_size))
  image_size = image_size or params["img/pos_embedding"].shape[1] * img["patch_size"]
  optional = {k: params.pop(k) for k in list(params) if k.startswith("img/head/")}
  assumed = tuple(name for name, known in (
      ("num_heads", _heads_known(img["width"], config)),
      ("activation", bool(config.get("model_args", {}).get("act_layer")
                          or config.get("architecture")))) if not known)
  return common.Checkpoint(
      format_name, path, params, dict(img=img), image_size=int(image_size), assumed=assumed,
      mean=tuple(cfg.get("mean") or mean), std=tuple(cfg.get("std") or std),
      optional=optional, resample=resample.antialiased_resample_grid)


def read_state(path: str, wrappers=("state_dict", "model"),
               prefixes=("module.",)) -> dict[str, np.ndarray]:
  """timm's training checkpoints keep the weights under `state_dict`; see common."""
  return common.read_state_dict(path, wrappers, prefixes)


def read(path: str) -> common.Checkpoint:
  config = {}
  weights = path
  if os.path.isdir(path):
    config = _timm_config(path) or {}
    weights = _weights_file(path)
    if weights is None:
      raise common.CheckpointImportError(f"{path}: no {' or '.join(WEIGHT_FILES)}")
  state = read_state(weights)
  if not looks_like_vit(set(state)):
    raise common.CheckpointImportError(
        f"{weights}: not a timm ViT state dict (no {' / '.join(REQUIRED)})")
  return from_state(state, config, path, FORMAT)
