"""facebookresearch/dino ViT checkpoints: the released backbones (`dino_vits16_pretrain.pth`,
`dino_vitb8_pretrain.pth`, ...) and full training checkpoints (`teacher` / `student` dicts
beside `optimizer`, `epoch` and `args`, an argparse.Namespace: the one class allowed when
unpickling).

DINO's ViT is timm's key layout (its `VisionTransformer` is timm's, with the classifier
removed), so `timm_vit.rules()` converts it. A bare backbone file IS a timm state dict: it is
detected as "timm", and format="dino" reads it as well. A training checkpoint is recognised by
its wrapper dicts or its `backbone.` / `module.backbone.` prefixes; its teacher is read when
both are present (the teacher is what DINO evaluates and releases), else the student. The DINO
projection head (`head.mlp.*`, weight-normalised `head.last_layer`) goes to
`Checkpoint.optional` as `head/fc{i}`, `head/last_layer` (the layout of `models/dino.Head`);
a head with BatchNorm (`use_bn_in_head`) has no such form and is dropped. ResNet-50 DINO
files belong to the "dino_resnet" format: `detect` says no to them.

DINO's ViTs (tiny, small, base) all have 64-wide attention heads, so width // 64 heads.
Pooling: the class token after the final LayerNorm, exact GELU, eps 1e-6 (the "dino" preset);
inputs normalised with ImageNet's mean and std at 224 px. A position grid resized to another
image size uses PyTorch's plain bicubic (DINO's `interpolate_pos_encoding` resizes bicubically
without antialiasing, by a scale factor with a +0.1 offset, so its grid differs slightly).
"""

import os
import re
from typing import Mapping

from absl import logging
import numpy as np

from agriclip_jax.models.importers import common
from agriclip_jax.models.importers import timm_vit

FORMAT = "dino"

EXTENSIONS = (".pth", ".pt", ".bin", ".tar")
# Where training checkpoints keep the network, in order of preference.
WRAPPERS = ("teacher", "student", "state_dict", "model")
PREFIXES = ("module.", "backbone.")


def detect(path: str) -> bool:
  """A DINO training checkpoint of a ViT: wrapped (teacher / student) or prefixed keys whose
  backbone is a ViT (a ResNet's `conv1`, `layer1.0...` keys are not)."""
  if not (os.path.isfile(path) and path.endswith(EXTENSIONS)):
    return False
  keys = timm_vit.peek_keys(path)
  vit = any(key.endswith(timm_vit.REQUIRED[1]) for key in keys)
  # Not a bare `module.` prefix: that is any DistributedDataParallel save (timm reads those).
  wrapped = any(w in keys for w in WRAPPERS[:2]) or any(
      key.startswith(("backbone.", "module.backbone.")) and key.endswith(timm_vit.REQUIRED[1])
      for key in keys)
  return vit and wrapped


def _linear_indices(state: Mapping[str, np.ndarray]) -> list[str]:
  """The head's Linear layers in order: `head.mlp.N` (N = 0, 2, 4 between GELUs), or
  `head.mlp` itself for a one-layer head."""
  found = [m.group(1) or "" for k in state
           if (m := re.fullmatch(r"head\.mlp(?:\.(\d+))?\.weight", k)) and state[k].ndim == 2]
  return sorted(found, key=lambda n: int(n) if n else -1)


def head_params(state: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
  """DINO's projection head as `models/dino.Head` parameters, or {} where it has no such form."""
  if not any(k.startswith("head.") for k in state):
    return {}
  if any(k.startswith("head.mlp.") and k.endswith("running_mean") for k in state):
    logging.warning("%s: DINO head with BatchNorm (use_bn_in_head) dropped", source)
    return {}
  out = {}
  for i, index in enumerate(_linear_indices(state)):
    name = f"head.mlp.{index}" if index else "head.mlp"
    out[f"head/fc{i}/kernel"] = common.linear(state[f"{name}.weight"])
    out[f"head/fc{i}/bias"] = state[f"{name}.bias"]
  last = "head.last_layer."
  direction = state.get(last + "weight_v", state.get(last + "parametrizations.weight.original1"))
  scale = state.get(last + "weight_g", state.get(last + "parametrizations.weight.original0"))
  if direction is None:
    logging.warning("%s: DINO head without a weight-normalised last layer dropped", source)
    return {}
  out["head/last_layer/kernel"] = common.linear(direction)
  if scale is not None and not np.allclose(scale, 1.0):  # Else norm_last_layer: fixed at 1.
    out["head/last_layer/scale"] = scale.reshape(-1)
  return out


def read(path: str) -> common.Checkpoint:
  state = timm_vit.read_state(path, WRAPPERS, PREFIXES)
  if not timm_vit.looks_like_vit(set(state)):
    raise common.CheckpointImportError(
        f"{path}: not a DINO ViT checkpoint (no {' / '.join(timm_vit.REQUIRED)}; a ResNet-50 "
        "DINO file is format 'dino_resnet')")
  head = head_params(state, path)
  backbone = {k: v for k, v in state.items() if not k.startswith("head.")}
  # DINO's ViTs (tiny, small, base) all have 64-wide heads: width // 64 is exact.
  heads = backbone["patch_embed.proj.weight"].shape[0] // 64
  checkpoint = timm_vit.from_state(backbone, {"model_args": {"num_heads": heads}}, path, FORMAT)
  checkpoint.model["img"]["preset"] = "dino"
  checkpoint.optional.update(head)
  checkpoint.resample = None
  return checkpoint
