"""The original AugReg / vit_jax and big_vision ViT `.npz` checkpoints (Flax parameter trees
saved with "/"-joined keys).

Two block layouts, told apart by their module numbering: vit_jax / AugReg
(`Transformer/encoderblock_N/LayerNorm_0`, `MultiHeadDotProductAttention_1`, `LayerNorm_2`,
`MlpBlock_3`; `Transformer/posembed_input/pos_embedding` [1, 1 + N, w] with the class token's
entry) and big_vision (`MultiHeadDotProductAttention_0`, `LayerNorm_1`, `MlpBlock_0`;
`pos_embedding` [1, N, w], added before the class token, if any, is prepended). Keys may sit
under `opt/target/` (vit_jax with optimizer state), `params/` or `params/img/` (a big_vision
two-tower LiT / SigLIP file: only its image tower is read; `params/txt`, `params/t` and the
optimizer state are ignored). big_vision's scanned form (`Transformer/encoderblock/...` stacked
over depth) is unstacked. Attention kernels are already [w, heads, hd], so the number of heads
is read from the file. Pooling: `MAPHead_0` -> map, a `cls` token -> tok, else gap (mean over
the patches), all after `Transformer/encoder_norm`; `head` -> `Checkpoint.optional`.

Both codebases use Flax's default `nn.gelu`, the tanh approximation (timm's ports of these files
use exact GELU instead), and LayerNorm eps 1e-6; images are scaled to [-1, 1] (mean = std = 0.5).
A grid resized to another image size is resampled bilinearly (PyTorch's kernel, no
antialiasing), as timm does when it loads these files. Refused in one line: `pre_logits` (the tanh representation layer of the first ViT releases),
files without a learned position embedding (big_vision's fixed sincos2d), and Dense (NaFlex)
patch embeddings.
"""

import os
import re
import zipfile
from typing import Mapping

import ml_dtypes
import numpy as np

from agriclip_jax.models.importers import common
from agriclip_jax.models.importers import resample
from agriclip_jax.models.importers import timm_vit
from agriclip_jax.models.importers.common import Rule

FORMAT = "big_vision"

# Where the image model's tree sits, tried in order ("params/img/" before "params/").
PREFIXES = ("opt/target/", "params/img/", "params/", "")


def rules() -> list[Rule]:
  """big_vision / vit_jax parameter names -> this project's; only names change (both are Flax)."""
  block = r"Transformer/encoderblock_(?P<block>\d+)/"
  out = "img/encoder/{block}/"
  leaf = r"/(?P<leaf>kernel|bias|scale)"
  attention = r"MultiHeadDotProductAttention_[01]/(?P<attn>query|key|value|out)" + leaf
  pool = "MAPHead_0/"
  return [
      Rule(r"embedding" + leaf, "img/embedding/{leaf}"),
      Rule(r"cls", "img/cls"),
      Rule(r"(Transformer/posembed_input/)?pos_embedding", "img/pos_embedding"),
      Rule(block + r"LayerNorm_0" + leaf, out + "norm1/{leaf}"),
      Rule(block + attention, out + "attn/{attn}/{leaf}"),
      Rule(block + r"LayerNorm_[12]" + leaf, out + "norm2/{leaf}"),
      Rule(block + r"MlpBlock_[03]/Dense_0" + leaf, out + "mlp/fc1/{leaf}"),
      Rule(block + r"MlpBlock_[03]/Dense_1" + leaf, out + "mlp/fc2/{leaf}"),
      Rule(r"Transformer/encoder_norm" + leaf, "img/encoder/norm/{leaf}"),
      Rule(pool + r"probe", "img/map_head/probe"),
      Rule(pool + attention, "img/map_head/attn/{attn}/{leaf}"),
      Rule(pool + r"LayerNorm_0" + leaf, "img/map_head/norm/{leaf}"),
      Rule(pool + r"MlpBlock_0/Dense_0" + leaf, "img/map_head/mlp/fc1/{leaf}"),
      Rule(pool + r"MlpBlock_0/Dense_1" + leaf, "img/map_head/mlp/fc2/{leaf}"),
      Rule(r"head" + leaf, "img/head/{leaf}"),
  ]


def _prefix(names) -> str | None:
  names = set(names)
  for prefix in PREFIXES:
    if f"{prefix}embedding/kernel" in names:
      return prefix
  return None


def detect(path: str) -> bool:
  if not (os.path.isfile(path) and path.endswith(".npz") and zipfile.is_zipfile(path)):
    return False
  with zipfile.ZipFile(path) as archive:
    names = [n[:-len(".npy")] for n in archive.namelist() if n.endswith(".npy")]
  prefix = _prefix(names)
  return prefix is not None and any(n.startswith(prefix + "Transformer/") for n in names)


def _unstack_scanned(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """big_vision's scanned encoder (`Transformer/encoderblock/...`, [depth, ...]) -> one key per
  block, as the unscanned form names them."""
  out = {}
  for key, value in state.items():
    if key.startswith("Transformer/encoderblock/"):
      rest = key[len("Transformer/encoderblock/"):]
      for i, layer in enumerate(value):
        out[f"Transformer/encoderblock_{i}/{rest}"] = layer
    else:
      out[key] = value
  return out


def load_state(path: str) -> dict[str, np.ndarray]:
  """The image model's arrays by name, without prefix; raw bfloat16 (saved as 2-byte voids)
  viewed as bfloat16."""
  data = common.read_npz(path)
  prefix = _prefix(data)
  if prefix is None:
    raise common.CheckpointImportError(
        f"{path}: no embedding/kernel under any of {', '.join(repr(p) for p in PREFIXES)}")
  state = {}
  for key, value in data.items():
    if key.startswith(prefix):
      if value.dtype.kind == "V" and value.dtype.itemsize == 2:
        value = value.view(ml_dtypes.bfloat16)
      state[key[len(prefix):]] = value
  return _unstack_scanned(state)


def _refuse_unsupported(state: Mapping[str, np.ndarray], path: str) -> None:
  if any(k.startswith("pre_logits/") for k in state):
    raise common.CheckpointImportError(
        f"{path}: pre_logits (a Dense + tanh representation layer before the head) is not "
        "supported; AugReg checkpoints have none")
  if "pos_embedding" not in state and "Transformer/posembed_input/pos_embedding" not in state:
    raise common.CheckpointImportError(
        f"{path}: no learned position embedding (a fixed sincos2d model?); not supported")
  if state["embedding/kernel"].ndim != 4:
    raise common.CheckpointImportError(
        f"{path}: embedding/kernel is {tuple(state['embedding/kernel'].shape)}, not a conv "
        "kernel (NaFlex); not supported")


def architecture(state: Mapping[str, np.ndarray]) -> dict:
  """`config.model.img` from the array shapes (heads from the [w, heads, hd] query kernel)."""
  kernel = state["embedding/kernel"]
  first = "Transformer/encoderblock_0/"
  query = next(v for k, v in state.items()
               if re.fullmatch(first + r"MultiHeadDotProductAttention_[01]/query/kernel", k))
  dense = next(v for k, v in state.items()
               if re.fullmatch(first + r"MlpBlock_[03]/Dense_0/kernel", k))
  depth = 1 + max(int(m.group(1)) for k in state
                  if (m := re.match(r"Transformer/encoderblock_(\d+)/", k)))
  pool = "map" if "MAPHead_0/probe" in state else "tok" if "cls" in state else "gap"
  return dict(preset="timm", width=int(kernel.shape[-1]), depth=depth,
              mlp_dim=int(dense.shape[-1]), num_heads=int(query.shape[1]),
              patch_size=int(kernel.shape[0]), pool_type=pool, class_token="cls" in state,
              num_registers=0, patch_bias="embedding/bias" in state, activation="gelu_tanh",
              layer_norm_eps=1e-6, head=False)


def read(path: str) -> common.Checkpoint:
  state = load_state(path)
  _refuse_unsupported(state, path)
  img = architecture(state)
  params = common.convert(state, rules(), path)
  pos_len = params["img/pos_embedding"].reshape(-1, img["width"]).shape[0]
  timm_vit.fold_prefix_positions(params, img, timm_vit.grid_tokens(pos_len, img, None))
  optional = {k: params.pop(k) for k in list(params) if k.startswith("img/head/")}
  image_size = params["img/pos_embedding"].shape[1] * img["patch_size"]
  return common.Checkpoint(FORMAT, path, params, dict(img=img), image_size=image_size,
                           mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), optional=optional,
                           resample=resample.bilinear_resample_grid)
