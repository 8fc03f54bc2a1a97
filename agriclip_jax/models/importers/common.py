"""What every importer shares: safe weight-file readers, the mapping-table converter, and
fitting converted weights onto a configured model (position grids resampled: resample.py).

An importer is a module with `FORMAT` (its name), `detect(path) -> bool` and
`read(path) -> Checkpoint`. It converts a source state dict with an ordered table of
`Rule(source regex, target template(s), transform)`: the first rule whose regex fully matches a
source key decides; targets are formatted with the regex's groups; a rule with target None
drops the key on purpose. A source key no rule matches is an error, so nothing is ignored by
accident. Transforms only re-order axes (e.g. a PyTorch Linear's [out, in] becomes [in, out]);
`fit` then reshapes to the target parameter's shape where that only splits or merges adjacent
axes ([in, heads * head_dim] -> [in, heads, head_dim]).
"""

import argparse
import contextlib
import dataclasses
import json
import os
import re
import struct
from typing import Any, Callable, Iterable, Mapping, Sequence

import ml_dtypes
import numpy as np

from agriclip_jax import config_lib
from agriclip_jax.models.importers import resample


class CheckpointImportError(config_lib.ConfigError):
  """A checkpoint cannot be read or does not fit the configured model."""


@dataclasses.dataclass
class Checkpoint:
  """A pretrained model converted to this project's parameter layout.

  `params` maps parameter paths ("img/encoder/block00/attn/query/kernel", "txt/...",
  "logit_scale") to arrays; `model` is the `config.model` it fits (`img` / `txt` tower
  dicts, present for the towers the file holds, plus `out_dim`, `logit_scale_init`, ...);
  `image_size`, `mean`, `std` are its preprocessing; `tokenizer(max_len)` builds its
  tokenizer (None when the file has no text tower or names no tokenizer).
  """
  format: str
  path: str
  params: dict[str, np.ndarray]
  model: dict[str, Any]
  image_size: int | None = None
  mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
  std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
  tokenizer: Callable[[int], Any] | None = None
  context_length: int | None = None
  # Parameters of the file that are not wanted by default (a classifier head): path -> array.
  optional: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  # Tower options the file does not state and `model` assumes (e.g. a bare file's activation
  # or head count): the configured model's values are taken for them, not checked.
  assumed: tuple[str, ...] = ()
  # How `fit` resizes a position grid (grid, height, width) -> grid, where the source resizes
  # differently from PyTorch's plain bicubic (`resample.resample_grid`, used when None).
  resample: Callable[[np.ndarray, int, int], np.ndarray] | None = None

  def num_params(self) -> int:
    return int(sum(np.prod(v.shape) for v in self.params.values()))


# ---------------------------------------------------------------------------- file readers

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Every tensor of a .safetensors file (bfloat16 included), read without PyTorch."""
  try:
    with open(path, "rb") as f:
      (header_len,) = struct.unpack("<Q", f.read(8))
      if header_len > 100 * 2**20:
        raise ValueError("header too large")
      header = json.loads(f.read(header_len))
      start = 8 + header_len
      out = {}
      for name, entry in header.items():
        if name == "__metadata__":
          continue
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        f.seek(start + begin)
        data = np.frombuffer(f.read(end - begin), dtype=dtype)
        out[name] = data.reshape(entry["shape"])
      return out
  except (OSError, ValueError, KeyError, struct.error) as e:
    raise CheckpointImportError(f"{path}: not a readable safetensors file ({e})") from None


def read_npz(path: str) -> dict[str, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  except (OSError, ValueError) as e:
    raise CheckpointImportError(f"{path}: not a readable .npz file ({e})") from None


def read_torch(path: str) -> Any:
  """A PyTorch pickle (.bin/.pt/.pth), unpickling only tensors and plain containers.

  `torch.load(weights_only=True)` refuses any other object, so a checkpoint that tries to run
  code on load is rejected instead of executed.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top  (only .bin/.pth files need it)
  except ImportError:
    raise CheckpointImportError(f"{path}: reading PyTorch pickles needs torch (pip install torch), or "
                       "convert the file to safetensors") from None
  try:
    data = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
  except Exception as e:  # pylint: disable=broad-except  (pickle, zip and torch errors)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise CheckpointImportError(f"{path}: refused or unreadable PyTorch checkpoint ({first})") from None
  return _to_numpy(data)


def _to_numpy(tree):
  if hasattr(tree, "detach") and hasattr(tree, "numpy"):
    tensor = tree.detach().cpu()
    if str(tensor.dtype) == "torch.bfloat16":
      return tensor.float().numpy().astype(ml_dtypes.bfloat16)
    return tensor.numpy()
  if isinstance(tree, Mapping):
    return {k: _to_numpy(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return type(tree)(_to_numpy(v) for v in tree)
  return tree


def read_weights(path: str) -> dict[str, Any]:
  """A weights file by its extension: .safetensors, .npz, or a PyTorch pickle."""
  if not os.path.isfile(path):
    raise CheckpointImportError(f"{path}: no such file")
  if path.endswith(".safetensors"):
    return read_safetensors(path)
  if path.endswith(".npz"):
    return read_npz(path)
  return read_torch(path)


@contextlib.contextmanager
def _argparse_namespaces_allowed():
  """Training checkpoints (timm's, DINO's) pickle their `args` as an argparse.Namespace, which
  `weights_only` loading refuses: allow that one plain class, and nothing else."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    yield  # read_torch says that torch is needed.
    return
  with torch.serialization.safe_globals([argparse.Namespace]):
    yield


def read_state_dict(path: str, wrappers: Sequence[str] = (),
                    prefixes: Sequence[str] = ()) -> dict[str, np.ndarray]:
  """The arrays of a weights file: inside the first of `wrappers` it has (a training
  checkpoint's "teacher", "state_dict", ...), keys without `prefixes` ("module.", ...)."""
  if path.endswith(".safetensors"):
    data = read_safetensors(path)
  else:
    if not os.path.isfile(path):
      raise CheckpointImportError(f"{path}: no such file")
    with _argparse_namespaces_allowed():
      data = read_torch(path)
  if not isinstance(data, Mapping):
    raise CheckpointImportError(f"{path}: holds a {type(data).__name__}, not a state dict")
  for wrapper in wrappers:
    if isinstance(data.get(wrapper), Mapping):
      data = data[wrapper]
      break
  state = strip_prefixes(data, prefixes)
  return {k: v for k, v in state.items() if isinstance(v, np.ndarray)}


def read_json(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointImportError(f"{path}: unreadable JSON ({e})") from None


def strip_prefixes(state: Mapping[str, Any], prefixes: Sequence[str]) -> dict[str, Any]:
  """Removes, repeatedly, any of `prefixes` from the start of every key."""
  out = {}
  for key, value in state.items():
    changed = True
    while changed:
      changed = False
      for prefix in prefixes:
        if key.startswith(prefix):
          key, changed = key[len(prefix):], True
    out[key] = value
  return out


# ----------------------------------------------------------------------------- conversion

@dataclasses.dataclass(frozen=True)
class Rule:
  """Source keys matching `source` become `target` (or several, if `transform` returns a
  tuple); `target=None` drops them on purpose."""
  source: str
  target: str | tuple[str, ...] | None
  transform: Callable[[np.ndarray], Any] | None = None


def linear(x: np.ndarray) -> np.ndarray:
  """PyTorch Linear weight [out, in] -> [in, out]; vectors unchanged."""
  return x.T if x.ndim == 2 else x


def conv(x: np.ndarray) -> np.ndarray:
  """PyTorch Conv2d weight [out, in, kh, kw] -> [kh, kw, in, out]."""
  return x.transpose(2, 3, 1, 0)


def split_qkv(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """A fused in-projection ([3 * width, width] weight or [3 * width] bias) -> q, k, v, each
  transposed like `linear`."""
  return tuple(linear(part) for part in np.split(x, 3, axis=0))


def convert(state: Mapping[str, np.ndarray], rules: Iterable[Rule],
            source_name: str) -> dict[str, np.ndarray]:
  """Applies the first matching rule to every key; unmatched keys are an error."""
  rules = [(re.compile(r.source), r) for r in rules]
  out, unmatched = {}, []
  for key, value in state.items():
    for pattern, rule in rules:
      match = pattern.fullmatch(key)
      if match:
        break
    else:
      unmatched.append(key)
      continue
    if rule.target is None:
      continue
    value = np.asarray(value)
    if value.dtype in (np.float16, np.float64, ml_dtypes.bfloat16):
      value = value.astype(np.float32)  # bf16 / fp16 files: fold and transform in float32.
    value = rule.transform(value) if rule.transform else value
    targets = (rule.target,) if isinstance(rule.target, str) else rule.target
    values = (value,) if isinstance(rule.target, str) else value
    for target, v in zip(targets, values):
      out[target.format(*match.groups(), **_named_fields(match))] = np.asarray(v)
  if unmatched:
    raise CheckpointImportError(f"{source_name}: {len(unmatched)} keys have no conversion rule, e.g. "
                       f"{', '.join(sorted(unmatched)[:5])}")
  return out


ATTENTION_NAMES = {"q": "query", "k": "key", "v": "value", "o": "out", "out": "out",
                   "query": "query", "key": "key", "value": "value", "proj": "out"}


def _named_fields(match: re.Match) -> dict[str, str]:
  """Named groups for target templates: `(?P<block>\\d+)` becomes this project's block name
  ("block07") and `(?P<attn>...)` an attention projection's name ("query", ..., "out")."""
  fields = dict(match.groupdict())
  if fields.get("block") is not None:
    fields["block"] = f"block{int(fields['block']):02d}"
  if fields.get("attn") is not None:
    fields["attn"] = ATTENTION_NAMES[fields["attn"]]
  return fields


def fold_class_position(params: dict[str, np.ndarray], prefix: str, num_prefix: int,
                        cls_key: str | None = "cls") -> None:
  """A [1, prefix + gh * gw, d] (or [prefix + n, d]) sequence position embedding, stored at
  `{prefix}/pos_embedding`, becomes this project's [1, gh, gw, d] grid; the class token's
  position (if any) is added to the class token, which is then position-free as here."""
  key = f"{prefix}/pos_embedding"
  pos = params[key].reshape(-1, params[key].shape[-1])
  if num_prefix and cls_key:
    params[f"{prefix}/{cls_key}"] = (params[f"{prefix}/{cls_key}"].reshape(1, 1, -1)
                                     + pos[:1][None])
  grid = pos[num_prefix:]
  side = int(round(np.sqrt(grid.shape[0])))
  if side * side != grid.shape[0]:
    raise CheckpointImportError(f"{key}: {grid.shape[0]} patch positions are not a square grid")
  params[key] = grid.reshape(1, side, side, -1)


# --------------------------------------------------------------------- fitting to a model

def _reshapeable(source: tuple[int, ...], target: tuple[int, ...]) -> bool:
  """Whether `target` is `source` with adjacent axes split or merged only."""
  if source == target:
    return True
  if int(np.prod(source)) != int(np.prod(target)):
    return False
  i = j = 0
  while i < len(source) and j < len(target):
    a, b = source[i], target[j]
    i, j = i + 1, j + 1
    while a != b:
      if a < b and i < len(source):
        a, i = a * source[i], i + 1
      elif b < a and j < len(target):
        b, j = b * target[j], j + 1
      else:
        return False
  return all(s == 1 for s in source[i:]) and all(t == 1 for t in target[j:])


def fit(checkpoint: Checkpoint, target: Mapping[str, Any], select: Callable[[str], bool],
        where: str, optional: bool = False) -> dict[str, np.ndarray]:
  """The checkpoint's parameters that `select` keeps, shaped like `target`'s
  (path -> ShapeDtypeStruct); a position grid of another size is resampled. `optional`
  includes `checkpoint.optional` (a classifier head). Raises one line naming the first
  parameters that do not fit."""
  out, problems = {}, []
  source = {**checkpoint.params, **(checkpoint.optional if optional else {})}
  for key, value in source.items():
    if not select(key):
      continue
    if key not in target:
      problems.append(f"{key} {tuple(value.shape)} is not in this model")
      continue
    shape = tuple(target[key].shape)
    if key.endswith("pos_embedding") and value.ndim == 4 and value.shape != shape:
      if value.shape[3] == shape[3] and len(shape) == 4:
        value = (checkpoint.resample or resample.resample_grid)(value, shape[1], shape[2])
    elif (key.endswith("txt/pos_embedding") and value.ndim == 3 and len(shape) == 3
          and value.shape[2] == shape[2] and value.shape[1] > shape[1]):
      value = value[:, :shape[1]]  # A shorter context keeps the first positions.
    if not _reshapeable(tuple(value.shape), shape):
      problems.append(f"{key} is {tuple(value.shape)} in the checkpoint vs {shape} here")
      continue
    out[key] = np.asarray(value, np.float32).reshape(shape)
  if problems:
    more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
    raise CheckpointImportError(f"{where}: {checkpoint.path} ({checkpoint.format}) does not fit the "
                       f"configured model: {'; '.join(problems[:3])}{more}")
  return out
