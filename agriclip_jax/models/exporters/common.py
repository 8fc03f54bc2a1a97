"""What the exporters share: the importers' mapping tables read backwards, a safetensors
writer, and the check that a model fits a target format.

An importer's table maps source keys (regexes with named groups) to this project's parameter
paths (templates); `invert` runs the same table the other way, so one table defines both
directions and an import -> export round trip is exact by construction (and tested). Each
rule's transform must have a known inverse (`INVERSES`); parameters are first flattened back
to the shape `convert` produced before `fit` reshaped them (attention projections to
[in, heads * head_dim]).
"""

import json
import os
import re
import struct
from typing import Any, Callable, Mapping

import numpy as np

from agriclip_jax import config_lib
from agriclip_jax import pytree
from agriclip_jax.models.importers import common as importers_common


class ExportError(config_lib.ConfigError):
  """A model cannot be written in the requested format (one line says why)."""


class Unexpressible(ExportError):
  """The model's architecture has no equivalent in the target format; `reasons` name what."""

  def __init__(self, target: str, reasons: list[str]):
    self.target, self.reasons = target, reasons
    super().__init__(f"{target} cannot express this model: {'; '.join(reasons)}")


def unconv(x: np.ndarray) -> np.ndarray:
  """[kh, kw, in, out] -> PyTorch Conv2d's [out, in, kh, kw] (inverse of `conv`)."""
  return x.transpose(3, 2, 0, 1)


def merge_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Inverse of `split_qkv`: a fused in-projection ([3 * width, width] or [3 * width])."""
  return np.concatenate([importers_common.linear(x) for x in (q, k, v)], axis=0)


# transform -> its inverse (single target) or merger (several targets).
INVERSES: dict[Callable | None, Callable] = {
    None: lambda x: x,
    importers_common.linear: importers_common.linear,  # A transpose is its own inverse.
    importers_common.conv: unconv,
    importers_common.split_qkv: merge_qkv,
}

_GROUPS = {"block": r"block\d+", "attn": "query|key|value|out"}


def _target_pattern(template: str) -> re.Pattern:
  """A target template ("img/encoder/{block}/norm{n}/scale") as a regex with named groups."""
  parts = re.split(r"\{(\w+)\}", template)
  regex = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>{_GROUPS.get(p, '[^/]+?')})"
                  for i, p in enumerate(parts))
  return re.compile(regex)


def _source_template(source: str) -> tuple[str, dict[str, list[str]]] | None:
  """A source regex as a format template and its groups' alternatives, or None when it is
  not a plain key with named groups (such rules only drop keys on import)."""
  groups = {}

  def group(match):
    groups[match.group(1)] = match.group(2).split("|")
    return "{" + match.group(1) + "}"

  template = re.sub(r"\(\?P<(\w+)>([^()]*)\)", group, source)
  template = template.replace(r"\.", ".")
  if re.search(r"[\\()|\[\]*+?]", template):
    return None
  return template, groups


def _source_value(name: str, value: str, alternatives: list[str]) -> str:
  """A target group's value ("block07", "query") as the source spells it ("7", "q")."""
  if name == "block":
    return str(int(value[len("block"):]))
  if name == "attn":
    for alt in alternatives:
      if importers_common.ATTENTION_NAMES.get(alt) == value:
        return alt
    raise ExportError(f"no source name for attention projection {value!r}")
  return value


def flat_shape(path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape `convert` gives a parameter before `fit` splits its axes: attention
  projections [in, heads, head_dim] / [heads, head_dim, out] / [heads, head_dim] as matrices
  and vectors."""
  if "/attn/" in path:
    if path.endswith("out/kernel") and len(shape) == 3:
      return (shape[0] * shape[1], shape[2])
    if len(shape) == 3:
      return (shape[0], shape[1] * shape[2])
    if path.endswith("bias") and len(shape) == 2:
      return (shape[0] * shape[1],)
  return shape


def invert(params: Mapping[str, np.ndarray], rules, where: str) -> dict[str, np.ndarray]:
  """Source-format keys and arrays for `params` (our paths), by `rules` read backwards: the
  first rule whose target matches a path decides. A path no rule produces is an error."""
  compiled = []
  for rule in rules:
    if rule.target is None:
      continue
    source = _source_template(rule.source)
    if source is None:
      continue
    targets = (rule.target,) if isinstance(rule.target, str) else rule.target
    if rule.transform not in INVERSES:
      raise ExportError(f"{where}: rule {rule.source!r} has no inverse transform")
    compiled.append((rule, source, [_target_pattern(t) for t in targets]))
  out, unmatched, pending = {}, [], {}
  for path, value in params.items():
    value = np.asarray(value, np.float32)
    value = value.reshape(flat_shape(path, value.shape))
    for rule, (template, alternatives), patterns in compiled:
      hits = [(i, p.fullmatch(path)) for i, p in enumerate(patterns)]
      hits = [(i, m) for i, m in hits if m]
      if hits:
        break
    else:
      unmatched.append(path)
      continue
    index, match = hits[0]
    fields = {k: _source_value(k, v, alternatives.get(k, [])) for k, v in match.groupdict().items()}
    key = template.format(**fields)
    if len(patterns) == 1:
      out[key] = np.array(INVERSES[rule.transform](value), order="C")
    else:  # Several of our parameters make one source array: merged when all are there.
      parts = pending.setdefault(key, [None] * len(patterns))
      parts[index] = value
      if all(p is not None for p in parts):
        out[key] = np.array(INVERSES[rule.transform](*parts), order="C")
        del pending[key]
  if unmatched or pending:
    missing = unmatched + [f"part of {k}" for k in pending]
    raise ExportError(f"{where}: {len(missing)} parameters have no place in the format, e.g. "
                      f"{', '.join(sorted(missing)[:5])}")
  return out


def unfold_class_position(params: dict[str, np.ndarray], prefix: str,
                          class_token: bool) -> None:
  """Inverse of `fold_class_position`: our [1, gh, gw, d] grid (and position-free class
  token) as a [prefix + gh * gw, d] sequence whose class position is zero."""
  grid = params[f"{prefix}/pos_embedding"]
  sequence = grid.reshape(-1, grid.shape[-1])
  if class_token:
    sequence = np.concatenate([np.zeros_like(sequence[:1]), sequence])
    params[f"{prefix}/cls"] = params[f"{prefix}/cls"].reshape(-1)
  params[f"{prefix}/pos_embedding"] = sequence


def fold_patch_bias(params: dict[str, np.ndarray], prefix: str) -> None:
  """A patch-embedding bias added to every patch equals the same vector added to every
  position of the grid: formats without the bias get it in their position embedding."""
  bias = params.pop(f"{prefix}/embedding/bias", None)
  if bias is not None:
    params[f"{prefix}/pos_embedding"] = params[f"{prefix}/pos_embedding"] + bias


# ---------------------------------------------------------------------------- writing

_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int64): "I64",
           np.dtype(np.int32): "I32"}


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
  """A .safetensors file (PyTorch's `format: pt` metadata unless given), written without torch
  and atomically (a partial file never has the final name)."""
  header, offset, blobs = {}, 0, []
  for name in sorted(tensors):
    array = np.array(tensors[name], order="C")  # (ascontiguousarray makes scalars 1-d)
    if array.dtype not in _DTYPES:
      raise ExportError(f"{name}: dtype {array.dtype} is not written")
    blob = array.tobytes()
    header[name] = {"dtype": _DTYPES[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + len(blob)]}
    offset += len(blob)
    blobs.append(blob)
  header["__metadata__"] = dict(metadata or {"format": "pt"})
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)  # The data starts 8-byte aligned.
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    for blob in blobs:
      f.write(blob)
  os.replace(tmp, path)


def write_json(path: str, data: Any) -> None:
  with open(path, "w") as f:
    json.dump(data, f, indent=2)
    f.write("\n")


def flatten(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """A nested parameter dict as {"img/encoder/block00/...": numpy array}."""
  return {k: np.asarray(v) for k, v in pytree.flatten(params).items()}
