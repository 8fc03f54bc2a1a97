"""Trained models out, for PyTorch users: Hugging Face `transformers` and open_clip directories.

  exporters.export(model, out_dir, "hf" | "open_clip" | "native")

`Model` is a two-tower model in this project's terms (flat parameters, the towers' resolved
keyword arguments, tokenizer, preprocessing), made from a run or an imported checkpoint with
`from_run`. Each format module writes a directory its library loads with one line, and raises
`common.Unexpressible` naming every option it cannot express; `native` (safetensors of our
parameters plus our model config) takes any model.
"""

import dataclasses
from typing import Any

import numpy as np

from agriclip_jax.input import tokenizer as tokenizer_lib
from agriclip_jax.models import text
from agriclip_jax.models import two_towers
from agriclip_jax.models import vit
from agriclip_jax.models.exporters import common

FORMATS = ("hf", "open_clip", "native")


@dataclasses.dataclass
class Model:
  """A two-tower model to export.

  `params`: {"img/encoder/block00/...": float32 array}; `img` / `txt`: the towers' keyword
  arguments as `two_towers.tower_kwargs` resolves them (presets and variants applied;
  `num_classes` is the head's width or None); `logit_scale` is the capped scale's log.
  """
  params: dict[str, np.ndarray]
  img: dict[str, Any]
  txt: dict[str, Any]
  config: dict[str, Any]  # The `config.model` it was built from (for `native`).
  tokenizer: tokenizer_lib.Tokenizer
  image_size: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  source: str = ""

  @property
  def out_dim(self) -> int:
    return self.img["num_classes"] or self.img["width"]

  @property
  def logit_scale(self) -> float:
    """log of the scale, capped as the model caps it."""
    cap = float(np.log(self.config.get("max_logit_scale", 100.0)))
    return float(min(float(self.params["logit_scale"]), cap))

  @property
  def logit_bias(self) -> float | None:
    bias = self.params.get("logit_bias")
    return None if bias is None else float(bias)


def from_run(run) -> Model:
  """The model of a `runs.Run` of an image-text run (or an imported CLIP / SigLIP)."""
  import jax  # pylint: disable=g-import-not-at-top
  config = run.config
  if not run.has_text or "img" not in config.model or "txt" not in config.model:
    raise common.ExportError(f"{run.workdir}: only image-text (CLIP / SigLIP) models are "
                             f"exported; this is a {config.trainer!r} run")
  model_config = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(
      config.model)
  if model_config["img"].get("arch"):
    raise common.ExportError(f"{run.workdir}: its image tower is a ResNet "
                             f"({model_config['img']['arch']}); only ViT towers are exported")
  out_dim = model_config.get("out_dim")
  img = _complete(vit.Model, two_towers.tower_kwargs(model_config["img"], "img", out_dim,
                                                     "float32"))
  txt = _complete(text.Model, two_towers.tower_kwargs(model_config["txt"], "txt", out_dim,
                                                      "float32"))
  params = common.flatten(jax.device_get(run.params))
  txt["vocab_size"] = params["txt/embedding/embedding"].shape[0]
  for tower in (img, txt):
    tower.pop("dtype", None)
  return Model(params=params, img=img, txt=txt, config=model_config, tokenizer=run.tokenizer,
               image_size=int(params["img/pos_embedding"].shape[1] * img["patch_size"]),
               mean=tuple(config.input.mean), std=tuple(config.input.std), source=run.workdir)


def _complete(module, kwargs: dict[str, Any]) -> dict[str, Any]:
  """A tower's keyword arguments with the module's defaults for those the config leaves out."""
  defaults = {f.name: f.default for f in dataclasses.fields(module)
              if f.default is not dataclasses.MISSING and f.name not in ("parent", "name")}
  return {**defaults, **kwargs}


def export(model: Model, out: str, format: str) -> dict[str, Any]:  # pylint: disable=redefined-builtin
  """Writes `model` to the directory `out` in `format`; returns what was written (files and
  how to load them)."""
  from agriclip_jax.models.exporters import hf, native, open_clip  # pylint: disable=g-import-not-at-top
  modules = {"hf": hf, "open_clip": open_clip, "native": native}
  if format not in modules:
    raise common.ExportError(f"export format {format!r} is not one of {list(modules)}")
  return modules[format].export(model, out)
