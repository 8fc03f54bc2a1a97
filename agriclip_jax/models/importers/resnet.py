"""torchvision-layout ResNets, as DINO ships its ResNet-50 (`dino_resnet50_pretrain.pth`).

AgriCLIP's published aligners take DINO ResNet-50 features, so this reads that file: a bare
state dict (`conv1.weight`, `bn1.*`, `layer1.0.conv1.weight`, ..., `layer1.0.downsample.0/1`,
maybe `fc.*`), or a DINO training checkpoint (`teacher` / `student`, keys prefixed `module.`
and `backbone.`, with the DINO projection `head.*` and `args`). The teacher is preferred (it is
what DINO evaluates and releases); `head.*` and BatchNorm's `num_batches_tracked` are dropped;
`fc.*` becomes the optional classifier (`img/head`). Any torchvision ResNet with 64-wide
groups (18, 34, 50, 101, 152) is read; wide and grouped (ResNeXt) ones are refused.
"""

import os
import re
from typing import Any, Mapping

import numpy as np

from agriclip_jax.models import resnet
from agriclip_jax.models.importers import common
from agriclip_jax.models.importers.common import Rule, linear, conv

FORMAT = "dino_resnet"

EXTENSIONS = (".pth", ".pt", ".bin", ".tar", ".safetensors")
# Where training checkpoints keep the network, in order of preference.
WRAPPERS = ("teacher", "student", "state_dict", "model")
PREFIXES = ("module.", "backbone.")
REQUIRED = ("conv1.weight", "layer1.0.conv1.weight")
# ImageNet's normalisation, which DINO trains with.
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

_BATCH_NORM = (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"),
               ("running_var", "var"))


def batch_norm_rules(source: str, target: str) -> list[Rule]:
  """A torchvision BatchNorm2d at `source` (a regex) -> FrozenBatchNorm at `target`."""
  return [Rule(rf"{source}\.{name}", f"{target}/{ours}") for name, ours in _BATCH_NORM]


def rules() -> list[Rule]:
  block = r"layer(?P<stage>\d)\.(?P<index>\d+)\."
  out = "img/stage{stage}/block{index}/"
  return [
      Rule(r".*\.num_batches_tracked", None),  # A counter, not weights.
      Rule(r"head\..*", None),  # DINO's projection head, not part of the backbone.
      Rule(r"conv1\.weight", "img/stem/conv/kernel", conv),
      *batch_norm_rules(r"bn1", "img/stem/bn"),
      Rule(block + r"conv(?P<n>\d)\.weight", out + "conv{n}/kernel", conv),
      *batch_norm_rules(block + r"bn(?P<n>\d)", out + "bn{n}"),
      Rule(block + r"downsample\.0\.weight", out + "downsample_conv/kernel", conv),
      *batch_norm_rules(block + r"downsample\.1", out + "downsample_bn"),
      Rule(r"fc\.weight", "img/head/kernel", linear),
      Rule(r"fc\.bias", "img/head/bias"),
  ]


def read_state(path: str) -> dict[str, np.ndarray]:
  """The ResNet's state dict in `path`, unwrapped (teacher first) and without prefixes."""
  return common.read_state_dict(path, WRAPPERS, PREFIXES)


def _looks_like_resnet(state: Mapping[str, Any]) -> bool:
  return all(key in state for key in REQUIRED)


def detect(path: str) -> bool:
  if not (os.path.isfile(path) and path.endswith(EXTENSIONS)):
    return False
  try:
    return _looks_like_resnet(read_state(path))
  except common.CheckpointImportError:
    return False


def architecture(state: Mapping[str, np.ndarray], path: str) -> dict[str, Any]:
  """The `config.model.img` of the state dict: a variant name where it is a standard one."""
  block = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
  depths = []
  for stage in range(1, 5):
    indices = {int(m.group(1)) for k in state
               if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
    if not indices:
      raise common.CheckpointImportError(f"{path}: no layer{stage}.* keys; not a 4-stage ResNet")
    depths.append(max(indices) + 1)
  width = int(state["conv1.weight"].shape[0])
  inner = state["layer1.0.conv2.weight"].shape  # [out, in / groups, 3, 3]
  if inner[0] != width or inner[1] != width:
    raise common.CheckpointImportError(
        f"{path}: layer1.0.conv2 is {tuple(inner)}, a wide or grouped ResNet (ResNeXt); only "
        f"torchvision's resnet18/34/50/101/152 layouts are supported")
  for name, variant in resnet.VARIANTS.items():
    if width == 64 and variant == dict(block=block, depths=tuple(depths)):
      return dict(arch=name)
  return dict(arch="resnet", block=block, depths=tuple(depths), width=width)


def read(path: str) -> common.Checkpoint:
  state = read_state(path)
  if not _looks_like_resnet(state):
    raise common.CheckpointImportError(
        f"{path}: not a torchvision-layout ResNet (no {' / '.join(REQUIRED)}; keys are e.g. "
        f"{', '.join(sorted(state)[:4]) or 'none'})")
  model = dict(img=architecture(state, path))
  params = common.convert(state, rules(), path)
  optional = {k: params.pop(k) for k in list(params) if k.startswith("img/head/")}
  return common.Checkpoint(FORMAT, path, params, model, image_size=224, mean=MEAN, std=STD,
                           optional=optional)
