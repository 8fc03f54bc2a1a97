"""What evaluators are given, and how configs name them.

`config.evals` maps a name to an evaluator config with a `type`, e.g.
`config.evals.heldout = dict(type="zeroshot", split="heldout")`. An evaluator is built once
from its config and a `Context`, and `run(params)` returns `{metric name: value}`; the trainer
prefixes the names with the evaluator's name and writes them.
"""

import dataclasses
import importlib
from typing import Any, Callable

import jax
import ml_collections

from agriclip_jax import config_lib
from agriclip_jax.input.tokenizer import Tokenizer

# type -> module defining `default_config()` and `Evaluator(name, config, context)`.
REGISTRY = {
    "classification": "agriclip_jax.evaluators.classification",
    "knn": "agriclip_jax.evaluators.knn",
    "zeroshot": "agriclip_jax.evaluators.zeroshot",
}

COMMON_FIELDS = dict(type="", every=0)  # every=0: at config.eval_every


@dataclasses.dataclass(eq=False)  # Hashable by identity: compiled functions are cached on it.
class Context:
  """Everything an evaluator may use; the trainer fills it in."""
  mesh: jax.sharding.Mesh
  params_sharding: Any
  params_abstract: Any  # ShapeDtypeStructs of the parameters (for shape checks).
  # (params, uint8 images [b, s, s, 3]) -> normalised image embeddings [b, d]; traceable.
  encode_images: Callable[[Any, jax.Array], jax.Array]
  # (params, int32 tokens [b, l]) -> normalised text embeddings [b, d]; traceable.
  encode_texts: Callable[[Any, jax.Array], jax.Array] | None
  tokenizer: Tokenizer | None
  dataset: str
  data_dir: str | None
  image_size: int
  batch_size: int
  num_threads: int = 8


def _module(type_name: str):
  if type_name not in REGISTRY:
    raise config_lib.ConfigError(f"unknown evaluator type {type_name!r}; registered: "
                                 f"{sorted(REGISTRY)}")
  return importlib.import_module(REGISTRY[type_name])


def make(type_name: str, **fields) -> ml_collections.ConfigDict:
  """An evaluator config holding every field of `type_name` (so any of them can be overridden
  from the command line), with `fields` set. Unknown fields are a ConfigError."""
  defaults = {**COMMON_FIELDS, **_module(type_name).default_config(), "type": type_name}
  config_lib.check_keys(fields, defaults, f"evaluator {type_name}")
  return ml_collections.ConfigDict({**defaults, **fields})


def validate(evals: ml_collections.ConfigDict) -> None:
  """Checks every evaluator config's fields (before anything is built)."""
  for name, config in evals.items():
    if "type" not in config:
      raise config_lib.ConfigError(f"config.evals.{name} has no 'type'")
    fields = {**COMMON_FIELDS, **_module(config.type).default_config()}
    try:
      config_lib.check_keys(config, fields, f"evals.{name}")
    except config_lib.ConfigError as e:
      raise config_lib.ConfigError(f"{e}; evaluators of type {config.type!r} have fields "
                                   f"{sorted(fields)}") from None


def build(evals: ml_collections.ConfigDict, context: Context, default_every: int):
  """[(name, every, evaluator)] for `config.evals`."""
  out = []
  for name, config in evals.items():
    module = _module(config.type)
    full = ml_collections.ConfigDict({**module.default_config(), **config.to_dict()})
    full.every = full.get("every") or default_every
    out.append((name, full.every, module.Evaluator(name, full, context)))
  return out
