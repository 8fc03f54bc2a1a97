"""open_clip checkpoints: a directory as BioCLIP / BioCLIP 2 ship it, or a bare state dict.

Reads
- a directory with `open_clip_config.json` (`model_cfg` with `vision_cfg` / `text_cfg`,
  `preprocess_cfg`) and the weights open_clip itself looks for there, in its order:
  open_clip_model.safetensors, open_clip_pytorch_model.safetensors, open_clip_pytorch_model.bin,
  open_clip_pytorch_model.pth (then any other .safetensors / .bin / .pth);
- a bare open_clip or OpenAI-style state dict (.safetensors / .bin / .pt / .pth, also open_clip's
  training checkpoints `{"state_dict": {"module.visual...": ...}}`). Sizes are inferred from the
  shapes as open_clip's `build_model_from_openai_state_dict` does (64-wide heads); an
  `open_clip_config.json` beside the file is used when there is one. Without a config the
  activation is assumed to be QuickGELU, as OpenAI's CLIP was trained; pass
  `read(path, activation="gelu")` for GELU-trained (e.g. LAION) weights.

open_clip options mapped: LayerScale (`ls_init_value`, image tower), `no_ln_pre`, ViT
`pool_type` tok | avg (-> our gap), `final_ln_after_pool` with tok pooling, text `pool_type`
argmax | eos (-> our eot) | first | last, `no_causal_mask`, `proj_bias`, `proj_type="none"`,
`norm_kwargs` eps, `act_kwargs` approximate="tanh", the `custom_text` key layout (`text.*`),
`logit_bias` (SigLIP-style open_clip models), a 1-element `logit_scale`. Refused, with one line
naming what does not fit: ModifiedResNet and timm-backbone image towers, Hugging Face text
towers, attentional poolers and CoCa, custom attention blocks (qk_norm, scaled cosine
attention, ...), a text tower with LayerScale, the final LayerNorm after average pooling,
non-square images, and TorchScript archives (OpenAI's original .pt files: loading one runs its
code; use a state-dict copy of the weights).

At another image size the position grid is resampled as open_clip's own `resize_pos_embed`
does it: PyTorch's bicubic with antialias=True (for upsampling another kernel than the plain
bicubic, a=-0.5), so a model loaded here at a new size equals open_clip's at that size.

Tokenizer: open_clip's models use the CLIP BPE (`SimpleTokenizer`). When open_clip is installed
its packaged vocabulary builds an equal `tokenizers` pipeline (`input/clip_bpe.py`, serialisable with the
run); else a Hugging Face `tokenizer.json` in the directory is used (as `save_for_hf` writes
it); else `Checkpoint.tokenizer` is None and the config must name a tokenizer path. A config
naming a Hugging Face tokenizer (`hf_tokenizer_name`) uses the directory's tokenizer.json or
none; other cleaning (`tokenizer_kwargs`) gets none.
"""

import json
import os
import struct
import zipfile

import numpy as np

from agriclip_jax.models import layers
from agriclip_jax.input import clip_bpe
from agriclip_jax.models.importers import common
from agriclip_jax.models.importers import resample
from agriclip_jax.models.importers.common import Rule, conv, linear, split_qkv

FORMAT = "open_clip"
CONFIG_NAME = "open_clip_config.json"
# open_clip's own preference when it loads a local directory (factory._find_checkpoint_in_dir).
WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")
SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# A `custom_text` model's text keys (`text.` + these); other `text.*` keys are a HF text tower.
TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.resblocks.", "ln_final.",
             "text_projection", "cls_emb", "attn_mask")
# open_clip's text pooling -> ours. argmax takes the highest id, CLIP's end-of-text token.
TEXT_POOLING = {"argmax": "eot", "eos": "eot", "first": "first", "last": "last"}
CUSTOM_BLOCK_OPTIONS = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner",
                        "scale_attn", "scale_fc")


# --------------------------------------------------------------------------- mapping table

def _norm(source: str, target: str) -> list[Rule]:
  return [Rule(source + r"\.weight", target + "/scale"), Rule(source + r"\.bias", target + "/bias")]


def _blocks(source: str, target: str) -> list[Rule]:
  """open_clip's ResidualAttentionBlock: fused q/k/v in-projection, c_fc / c_proj MLP."""
  block = rf"{source}\.resblocks\.(?P<block>\d+)\."
  out = f"{target}/{{block}}/"
  return [
      Rule(block + r"attn\.in_proj_weight",
           tuple(out + f"attn/{n}/kernel" for n in ("query", "key", "value")), split_qkv),
      Rule(block + r"attn\.in_proj_bias",
           tuple(out + f"attn/{n}/bias" for n in ("query", "key", "value")), split_qkv),
      Rule(block + r"attn\.out_proj\.weight", out + "attn/out/kernel", linear),
      Rule(block + r"attn\.out_proj\.bias", out + "attn/out/bias"),
      *_norm(block + r"ln_(?P<n>[12])", out + "norm{n}"),
      Rule(block + r"mlp\.c_fc\.weight", out + "mlp/fc1/kernel", linear),
      Rule(block + r"mlp\.c_fc\.bias", out + "mlp/fc1/bias"),
      Rule(block + r"mlp\.c_proj\.weight", out + "mlp/fc2/kernel", linear),
      Rule(block + r"mlp\.c_proj\.bias", out + "mlp/fc2/bias"),
      Rule(block + r"ls_(?P<n>[12])\.gamma", out + "ls{n}/gamma"),
  ]


def rules() -> list[Rule]:
  """Keys as open_clip's `CLIP` names them (a `custom_text` model's `text.` prefix removed)."""
  return [
      Rule(r"logit_scale", "logit_scale"),
      Rule(r"logit_bias", "logit_bias"),
      # Buffers and TorchScript-era metadata, not weights.
      Rule(r"attn_mask|input_resolution|context_length|vocab_size", None),
      Rule(r"visual\.class_embedding", "img/cls"),
      Rule(r"visual\.positional_embedding", "img/pos_embedding"),
      Rule(r"visual\.conv1\.weight", "img/embedding/kernel", conv),
      *_norm(r"visual\.ln_pre", "img/pre_norm"),
      *_blocks(r"visual\.transformer", "img/encoder"),
      *_norm(r"visual\.ln_post", "img/encoder/norm"),
      Rule(r"visual\.proj", "img/head/kernel"),  # A [width, embed] matrix used as x @ proj.
      Rule(r"token_embedding\.weight", "txt/embedding/embedding"),
      Rule(r"positional_embedding", "txt/pos_embedding"),
      *_blocks(r"transformer", "txt/encoder"),
      *_norm(r"ln_final", "txt/encoder/norm"),
      Rule(r"text_projection", "txt/head/kernel"),  # Parameter form: [width, embed].
      Rule(r"text_projection\.weight", "txt/head/kernel", linear),  # nn.Linear (proj_bias).
      Rule(r"text_projection\.bias", "txt/head/bias"),
  ]


# ------------------------------------------------------------------------------- files

def _weights_in(directory: str) -> str | None:
  for name in WEIGHT_NAMES:
    if os.path.isfile(os.path.join(directory, name)):
      return os.path.join(directory, name)
  others = sorted(n for n in os.listdir(directory) if n.endswith(SUFFIXES))
  others.sort(key=lambda n: not n.endswith(".safetensors"))  # Stable: alphabetical within.
  return os.path.join(directory, others[0]) if others else None


def _files(path: str) -> tuple[str, dict | None]:
  """(weights file, open_clip_config.json contents or None) of a directory or a file."""
  if os.path.isdir(path):
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_path):
      raise common.CheckpointImportError(f"{path}: no {CONFIG_NAME}")
    weights = _weights_in(path)
    if weights is None:
      raise common.CheckpointImportError(f"{path}: no weights file ({', '.join(WEIGHT_NAMES)})")
    return weights, common.read_json(config_path)
  sibling = os.path.join(os.path.dirname(path), CONFIG_NAME)
  return path, common.read_json(sibling) if os.path.isfile(sibling) else None


def _torchscript_pickle(path: str) -> bytes | None:
  """The raw (never unpickled) data.pkl of a TorchScript archive, None for other files."""
  if not zipfile.is_zipfile(path):
    return None
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    if not any("/code/" in n or n.endswith("constants.pkl") for n in names):
      return None
    data = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    return archive.read(data[0]) if data else b""


def _unwrap(state, path: str) -> dict:
  """A training checkpoint's `state_dict`, with DistributedDataParallel's `module.` removed."""
  if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
    state = state["state_dict"]
  if not isinstance(state, dict):
    raise common.CheckpointImportError(f"{path}: not a state dict ({type(state).__name__})")
  return common.strip_prefixes(state, ["module."])


def _keys(path: str) -> list[str]:
  """A weights file's parameter names, reading as little as possible (detection)."""
  if path.endswith(".safetensors"):
    with open(path, "rb") as f:
      (length,) = struct.unpack("<Q", f.read(8))
      return [k for k in json.loads(f.read(length)) if k != "__metadata__"]
  if _torchscript_pickle(path) is not None:
    return []
  import torch  # pylint: disable=g-import-not-at-top
  try:  # Memory-mapped: the tensors are not read. Only tensors and containers are unpickled.
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
  except RuntimeError:
    state = torch.load(path, map_location="cpu", weights_only=True)
  return list(_unwrap(state, path))


def _looks_like_open_clip(keys) -> bool:
  return (any(k.startswith("visual.") for k in keys)
          and any(k == "logit_scale" or k.startswith(("text.", "token_embedding")) for k in keys))


def detect(path: str) -> bool:
  if os.path.isdir(path):
    return os.path.isfile(os.path.join(path, CONFIG_NAME))
  if not (os.path.isfile(path) and path.endswith(SUFFIXES)):
    return False
  script = _torchscript_pickle(path)
  if script is not None:
    return b"visual" in script and b"token_embedding" in script
  try:
    return _looks_like_open_clip(_keys(path))
  except Exception:  # pylint: disable=broad-except  (any unreadable file is simply not ours)
    return False


def load_state(path: str) -> dict[str, np.ndarray]:
  """The weights, keys as `rules` expects them (a custom-text model's `text.` prefix gone)."""
  if _torchscript_pickle(path) is not None:
    raise common.CheckpointImportError(
        f"{path}: a TorchScript archive (OpenAI's original .pt); it is not read because loading "
        "it runs its code: use a state-dict copy (open_clip's hf-hub weights or the Hugging "
        "Face openai/clip-* directory)")
  state = _unwrap(common.read_weights(path), path)
  out = {}
  for key, value in state.items():
    if key.startswith("text.") and key[5:].startswith(TEXT_KEYS):
      key = key[5:]
    out[key] = value
  return out


# --------------------------------------------------------------------------- architecture

def _refuse(where: str, what: str):
  raise common.CheckpointImportError(f"{where}: {what} cannot be expressed by this project's "
                                     "ViT / text towers")


def check_supported(state: dict, model_cfg: dict, where: str) -> None:
  """One line naming the first open_clip architecture this project cannot express."""
  vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
  keys = list(state)
  has = lambda prefix: any(k.startswith(prefix) for k in keys)
  if vision.get("timm_model_name") or has("visual.trunk."):
    _refuse(where, f"a timm-backbone image tower ({vision.get('timm_model_name', 'visual.trunk')})")
  if isinstance(vision.get("layers"), (list, tuple)) or has("visual.layer1.") or has(
      "visual.attnpool."):
    _refuse(where, "a ModifiedResNet image tower (OpenAI's RN50 family)")
  if text.get("hf_model_name") or has("text."):
    _refuse(where, f"a Hugging Face text tower ({text.get('hf_model_name', 'text.*')})")
  if "multimodal_cfg" in model_cfg or has("text_decoder.") or "cls_emb" in state:
    _refuse(where, "CoCa (a text decoder and a text class token)")
  if vision.get("attentional_pool") or has("visual.attn_pool"):
    _refuse(where, "an attentional pooler (visual.attn_pool)")
  for tower_name, cfg in (("vision", vision), ("text", text)):
    custom = [o for o in CUSTOM_BLOCK_OPTIONS if cfg.get(o)]
    if custom or cfg.get("block_type") == "custom":
      _refuse(where, f"custom attention blocks in the {tower_name} tower ({', '.join(custom)})")
  if any(k.startswith("transformer.") and k.endswith(".gamma") for k in keys):
    _refuse(where, "LayerScale in the text tower")
  if vision.get("pool_type", "tok") not in ("tok", "avg"):
    _refuse(where, f"vision pool_type {vision['pool_type']!r}")
  if vision.get("pool_type") == "avg" and vision.get("final_ln_after_pool"):
    _refuse(where, "average pooling before the final LayerNorm (final_ln_after_pool)")
  if text.get("pool_type", "argmax") not in TEXT_POOLING:
    _refuse(where, f"text pool_type {text['pool_type']!r}")
  for name in ("image_size", "patch_size"):
    value = vision.get(name)
    if isinstance(value, (list, tuple)) and len(set(value)) > 1:
      _refuse(where, f"a non-square vision {name} {list(value)}")


def _activation(model_cfg: dict | None, cfg: dict, override: str | None, where: str) -> str:
  if override:
    name = override
  elif model_cfg is None:  # A bare file: OpenAI's CLIP was trained with QuickGELU.
    name = "quick_gelu"
  elif model_cfg.get("quick_gelu"):
    name = "quick_gelu"
  else:
    kwargs = cfg.get("act_kwargs") or {}
    if kwargs and kwargs != {"approximate": "tanh"}:
      _refuse(where, f"activation arguments {kwargs}")
    name = "gelu_tanh" if kwargs else "gelu"
  if name not in layers.ACTIVATIONS:
    raise common.CheckpointImportError(f"{where}: activation {name!r} is not one of "
                                       f"{sorted(layers.ACTIVATIONS)}")
  return name


def _eps(cfg: dict, where: str) -> float:
  kwargs = dict(cfg.get("norm_kwargs") or {})
  eps = kwargs.pop("eps", 1e-5)
  if kwargs:
    _refuse(where, f"LayerNorm arguments {kwargs}")
  return float(eps)


def _transformer(state: dict, prefix: str, head_width: int, heads: int | None,
                 where: str) -> dict:
  """width / depth / mlp_dim / num_heads of the blocks under `prefix` (e.g. "visual.");
  `heads` if the config names it, else width // head_width."""
  start = f"{prefix}transformer.resblocks."
  depth = len({k[len(start):].split(".")[0] for k in state if k.startswith(start)})
  width = state[f"{start}0.attn.in_proj_weight"].shape[1]
  heads = heads or width // head_width
  if heads < 1 or width % heads:
    raise common.CheckpointImportError(
        f"{where}: cannot tell the attention heads of the {width}-wide "
        f"{'image' if prefix else 'text'} tower ({head_width}-wide heads assumed); add an "
        f"{CONFIG_NAME} naming them")
  return dict(width=width, depth=depth, mlp_dim=state[f"{start}0.mlp.c_fc.weight"].shape[0],
              num_heads=heads)


def image_tower(state: dict, model_cfg: dict | None, activation: str | None, where: str) -> dict:
  cfg = (model_cfg or {}).get("vision_cfg", {})
  pool = cfg.get("pool_type", "tok")
  out = dict(preset="open_clip",
             **_transformer(state, "visual.", cfg.get("head_width", 64), None, where),
             patch_size=state["visual.conv1.weight"].shape[-1], layer_norm_eps=_eps(cfg, where),
             activation=_activation(model_cfg, cfg, activation, where),
             pre_norm="visual.ln_pre.weight" in state, head="visual.proj" in state,
             pool_type="gap" if pool == "avg" else "tok", class_token=True)
  if any(k.startswith("visual.") and k.endswith(".ls_1.gamma") for k in state):
    out["layer_scale"] = 1e-5  # Only its presence matters: the imported gamma replaces it.
  return out


def text_tower(state: dict, model_cfg: dict | None, activation: str | None, where: str) -> dict:
  cfg = (model_cfg or {}).get("text_cfg", {})
  causal = not cfg.get("no_causal_mask", False)
  out = dict(preset="open_clip", **_transformer(state, "", 64, cfg.get("heads"), where),
             vocab_size=state["token_embedding.weight"].shape[0], layer_norm_eps=_eps(cfg, where),
             activation=_activation(model_cfg, cfg, activation, where), causal=causal,
             pool_type=TEXT_POOLING[cfg.get("pool_type", "argmax")],
             head=any(k.startswith("text_projection") for k in state),
             head_bias="text_projection.bias" in state)
  if not causal:  # open_clip's CLIP attends to padding in a bidirectional text tower.
    out["mask_padding"] = False
  return out


def _embed_dim(state: dict) -> int | None:
  for key, axis in (("visual.proj", 1), ("text_projection", 1), ("text_projection.weight", 0)):
    if key in state:
      return int(state[key].shape[axis])
  return None


def _preprocessing(config: dict | None, image_size: int) -> dict:
  """image_size / mean / std as open_clip's transforms would use them."""
  config = config or {}
  vision = config.get("model_cfg", config).get("vision_cfg", {})
  pre = config.get("preprocess_cfg", {})
  size = vision.get("image_size", image_size)
  out = {"image_size": int(size[0] if isinstance(size, (list, tuple)) else size)}
  mean, std = pre.get("mean", vision.get("image_mean")), pre.get("std", vision.get("image_std"))
  if mean and std:
    out.update(mean=tuple(mean), std=tuple(std))
  return out


def read(path: str, activation: str | None = None) -> common.Checkpoint:
  """The checkpoint at `path`; `activation` (e.g. "gelu") overrides the configured or assumed
  one (QuickGELU for a bare file)."""
  weights, config = _files(path)
  model_cfg = None if config is None else config.get("model_cfg", config)
  state = load_state(weights)
  check_supported(state, model_cfg or {}, path)
  if "visual.conv1.weight" not in state:
    raise common.CheckpointImportError(f"{path}: no open_clip ViT (visual.conv1.weight)")
  params = common.convert(state, rules(), path)
  common.fold_class_position(params, "img", num_prefix=1)
  for name in ("logit_scale", "logit_bias"):
    if name in params:
      params[name] = params[name].reshape(())  # open_clip's nonscalar_logit_scale is [1].
  model = dict(img=image_tower(state, model_cfg, activation, path), out_dim=_embed_dim(state),
               logit_scale_init=float(np.exp(params.get("logit_scale", np.log(1 / 0.07)))))
  context_length = tokenizer = None
  if "token_embedding.weight" in state:
    model["txt"] = text_tower(state, model_cfg, activation, path)
    params["txt/pos_embedding"] = params["txt/pos_embedding"][None]
    context_length = params["txt/pos_embedding"].shape[1]
    tokenizer = tokenizer_factory(path, (model_cfg or {}).get("text_cfg", {}),
                                  model["txt"]["vocab_size"])
  if "logit_bias" in params:
    model["logit_bias_init"] = float(params["logit_bias"])
  grid = params["img/pos_embedding"].shape[1]
  # A bare file states no activation (QuickGELU assumed) and only implies 64-wide heads.
  assumed = ("activation", "num_heads") if model_cfg is None and not activation else ()
  return common.Checkpoint(FORMAT, path, params, model, tokenizer=tokenizer,
                           context_length=context_length, assumed=assumed,
                           resample=resample.antialiased_resample_grid,
                           **_preprocessing(config, grid * model["img"]["patch_size"]))


def tokenizer_factory(path: str, text_cfg: dict, vocab_size: int):
  """The builder of the tokenizer open_clip would use for this checkpoint, or None."""
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  hf_json = os.path.join(directory, "tokenizer.json")

  def from_directory(max_len: int):
    from agriclip_jax.input import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
    return tokenizer_lib.from_pretrained(directory, max_len)

  if (text_cfg.get("tokenizer_kwargs") or {}) not in ({}, {"clean": "lower"}):
    return None  # Other cleaning (e.g. SigLIP's canonicalize): the config names a tokenizer.
  if text_cfg.get("hf_tokenizer_name"):  # A Hugging Face tokenizer: only its own files will do.
    return from_directory if os.path.isfile(hf_json) else None
  if vocab_size != clip_bpe.CLIP_VOCAB_SIZE:
    return None
  if clip_bpe.vocabulary_file():
    return clip_bpe.tokenizer
  return from_directory if os.path.isfile(hf_json) else None
