"""Any model, as this project describes it: model.safetensors of its parameters (keys are our
parameter paths with "/" as in the run) + agriclip_model.json (the `config.model`, resolved
tower arguments, preprocessing, tokenizer layout) + the tokenizer files.

What a model that neither transformers nor open_clip can express leaves as; it is read back
by `native.load` (and by no PyTorch library: the JSON says which architecture to build).
AgriCLIP's aligner (`export_aligner`) is a PyTorch `nn.Linear`'s weight and bias.
"""

import json
import os
from typing import Any

import numpy as np

from agriclip_jax.models.exporters import common

CONFIG = "agriclip_model.json"
WEIGHTS = "model.safetensors"
ALIGNER = "aligner.safetensors"


def export(model, out: str) -> dict[str, Any]:
  os.makedirs(out, exist_ok=True)
  common.write_safetensors(os.path.join(out, WEIGHTS),
                           {k: np.asarray(v, np.float32) for k, v in model.params.items()},
                           metadata={"format": "agriclip_jax"})
  towers = {k: {n: v for n, v in t.items() if n != "dtype"}
            for k, t in (("img", model.img), ("txt", model.txt))}
  common.write_json(os.path.join(out, CONFIG), dict(
      model=model.config, towers=towers, image_size=model.image_size, mean=list(model.mean),
      std=list(model.std), source=model.source))
  model.tokenizer.save(out)
  return {"format": "native", "out": out,
          "load": f"agriclip_jax.models.exporters.native.load({out!r})"}


def load(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(agriclip_model.json contents, {parameter path: array}) of a native export."""
  from agriclip_jax.models.importers import common as importers_common  # pylint: disable=g-import-not-at-top
  with open(os.path.join(path, CONFIG)) as f:
    description = json.load(f)
  return description, importers_common.read_safetensors(os.path.join(path, WEIGHTS))


def export_aligner(weights: np.ndarray, bias: np.ndarray, out: str,
                   source: str) -> dict[str, Any]:
  """AgriCLIP's linear map from DINO features to CLIP's embedding space, as PyTorch's
  `nn.Linear(d_in, d_out)` stores it: weight [d_out, d_in], bias [d_out]."""
  weights, bias = np.asarray(weights, np.float32), np.asarray(bias, np.float32).reshape(-1)
  os.makedirs(out, exist_ok=True)
  common.write_safetensors(os.path.join(out, ALIGNER),
                           {"weight": np.ascontiguousarray(weights.T), "bias": bias})
  common.write_json(os.path.join(out, "aligner.json"), dict(
      in_features=int(weights.shape[0]), out_features=int(weights.shape[1]), source=source))
  return {"format": "aligner", "out": out,
          "load": f"torch.nn.Linear({weights.shape[0]}, {weights.shape[1]})"
                  f".load_state_dict(safetensors.torch.load_file({ALIGNER!r}))"}
