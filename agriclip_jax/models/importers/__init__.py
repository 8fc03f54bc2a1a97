"""Pretrained checkpoints in other projects' formats, converted to this project's layout.

`read(path, format=None)` detects the format when none is given and returns a
`common.Checkpoint` (parameters by path, the `config.model` they fit, preprocessing, tokenizer).
Each format is one module here around its mapping table; add a format by adding a module and
listing it in `FORMATS` (detection tries them in this order).
"""

import importlib
import importlib.util
import os

from agriclip_jax.models import vit
from agriclip_jax.models.importers import common

# format name -> module (relative to this package).
FORMATS = {
    "hf_clip": "hf_clip",
    "hf_siglip": "hf_siglip",
    "hf_dinov2": "hf_dinov2",
    "hf_vit": "hf_vit",
    "open_clip": "open_clip",
    "timm": "timm_vit",
    "big_vision": "big_vision",
    "dino": "dino",
    "dino_resnet": "resnet",
}


TORCH_PICKLES = (".bin", ".pt", ".pth", ".tar")


def module(name: str):
  if name not in available():
    raise common.CheckpointImportError(
        f"unknown checkpoint format {name!r}; known: {', '.join(available())}")
  return importlib.import_module(f"{__name__}.{FORMATS[name]}")


def available() -> list[str]:
  """The formats whose modules exist (importers are added one format at a time)."""
  out = []
  for name, mod in FORMATS.items():
    if importlib.util.find_spec(f"{__name__}.{mod}") is not None:
      out.append(name)
  return out


def detect(path: str) -> str:
  path = os.path.expanduser(path)
  if not os.path.exists(path):
    raise common.CheckpointImportError(f"{path}: no such file or directory")
  for name in available():
    if module(name).detect(path):
      return name
  if path.endswith(TORCH_PICKLES) and importlib.util.find_spec("torch") is None:
    common.read_torch(path)  # Raises its one line: reading it needs torch.
  raise common.CheckpointImportError(
      f"{path}: not a checkpoint format this project reads ({', '.join(available())}); "
      "name one with format=...")


def read(path: str, format: str | None = None) -> common.Checkpoint:  # pylint: disable=redefined-builtin
  path = os.path.abspath(os.path.expanduser(path))
  name = format or detect(path)
  return module(name).read(path)


def build(checkpoint: common.Checkpoint, dtype: str = "float32",
          image_size: int | None = None):
  """(model, params) of the checkpoint (at `image_size`, default its own): a two-tower model
  when it has a text tower (`model.apply({"params": p}, images, tokens)`), else the image
  tower alone (`vit.Model`, returning (pooled, intermediates))."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from agriclip_jax.models import two_towers  # pylint: disable=g-import-not-at-top
  from agriclip_jax.pytree import flatten, unflatten  # pylint: disable=g-import-not-at-top
  if "img" not in checkpoint.model:
    raise common.CheckpointImportError(
        f"{checkpoint.path} ({checkpoint.format}) holds a text tower only: it can fill "
        "config.init.txt, not serve as a model on its own")
  size = image_size or checkpoint.image_size or 224
  images = jnp.zeros((1, size, size, 3), jnp.float32)
  if "txt" in checkpoint.model:
    model = two_towers.make(ml_collections.ConfigDict(dict(checkpoint.model, dtype=dtype)))
    tokens = jnp.zeros((1, checkpoint.context_length or 77), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), images, tokens)["params"]
  elif checkpoint.model["img"].get("arch", "").startswith("resnet"):
    from agriclip_jax.models import resnet  # pylint: disable=g-import-not-at-top
    model = resnet.Model(**resnet.tower_kwargs(checkpoint.model["img"], dtype=dtype))
    shapes = {"img": jax.eval_shape(model.init, jax.random.key(0), images)["params"]}
  else:
    model = vit.Model(**two_towers.tower_kwargs(checkpoint.model["img"], "img",
                                                checkpoint.model.get("out_dim"), dtype))
    shapes = {"img": jax.eval_shape(model.init, jax.random.key(0), images)["params"]}
  params = unflatten(common.fit(checkpoint, flatten(shapes), lambda k: True, checkpoint.path))
  return model, params if "txt" in checkpoint.model else params["img"]


# Tower options that change what the same weights compute (shapes cannot tell them apart).
_BEHAVIOUR = ("activation", "num_heads", "pool_type", "causal", "mask_padding", "pre_norm",
              "class_token", "layer_norm_eps")


def _resolved(tower: dict, kind: str) -> dict:
  from agriclip_jax.models import text  # pylint: disable=g-import-not-at-top
  from agriclip_jax.models import two_towers  # pylint: disable=g-import-not-at-top
  module = (vit.Model if kind == "img" else text.Model)(
      **two_towers.tower_kwargs(tower, kind, None, "float32"))
  out = {f: getattr(module, f, None) for f in _BEHAVIOUR}
  if kind == "img" and out["class_token"] is None:
    out["class_token"] = out["pool_type"] == "tok"
  return out


def check_architecture(checkpoint: common.Checkpoint, model_config, kinds, where: str) -> None:
  """One line naming the first tower option in which the configured model differs from the
  checkpoint's (e.g. QuickGELU vs GELU): same shapes, different function."""
  for kind in kinds:
    if kind not in checkpoint.model or not model_config or kind not in model_config:
      continue
    theirs, ours = dict(checkpoint.model[kind]), dict(model_config[kind])
    if "arch" in theirs or "arch" in ours:  # ResNets: their shapes say it all.
      continue
    theirs, ours = _resolved(theirs, kind), _resolved(ours, kind)
    for field in _BEHAVIOUR:
      if field in checkpoint.assumed:
        continue
      a, b = theirs[field], ours[field]
      same = (abs(a - b) <= 1e-3 * max(abs(a), abs(b)) if field == "layer_norm_eps" else a == b)
      if not same:
        raise common.CheckpointImportError(
            f"{where}: {checkpoint.path} ({checkpoint.format}) has {kind} {field}={a!r}, the "
            f"configured model {field}={b!r}: set config.model.{kind}.{field} (or the "
            f"family's preset; `python -m agriclip_jax.models.inspect` shows them all)")
