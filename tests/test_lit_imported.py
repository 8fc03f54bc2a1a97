"""LiT through launch.py on an imported tower: a random timm ViT saved in timm's safetensors
form is locked; the run trains, checkpoints, resumes, and never changes the locked weights. A
torchvision ResNet-18 (DINO's ResNet layout) is locked the same way."""

import jax
import numpy as np
import pytest

from agriclip_jax.models import importers
from agriclip_jax.trainers import state as state_lib
from agriclip_jax.pytree import flatten
from conftest import launch

DEVICE = jax.sharding.SingleDeviceSharding(jax.devices()[0])
torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")


def _timm_tower(path):
  """tests/tiny_config.py's image tower (32 px, patch 8, width 32, depth 1, 2 heads, MLP 64)."""
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  from timm.models import vision_transformer  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1,
                                               num_heads=2, mlp_ratio=2.0, num_classes=10)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  path.mkdir()
  save_file({k: v.contiguous() for k, v in model.state_dict().items()},
            str(path / "model.safetensors"))
  return str(path / "model.safetensors")


def test_lit_locks_an_imported_timm_tower_and_resumes(data_dir, tmp_path):
  weights = _timm_tower(tmp_path / "timm")
  workdir = str(tmp_path / "run")
  flags = (f"--config.init.img.path={weights}", "--config.init.img.format=timm")
  result = launch(workdir, "tests/tiny_config.py:kind=lit_imported", *flags,
                  "--config.total_steps=4", data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "config.init.img: " in result.stderr and "(timm)" in result.stderr
  first, _ = state_lib.load_entry(workdir, "params", DEVICE)
  result = launch(workdir, "tests/tiny_config.py:kind=lit_imported", *flags,
                  "--config.total_steps=8", "--config.allow_config_change=True",
                  data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Resuming from" in result.stderr
  trained, step = state_lib.load_entry(workdir, "params", DEVICE)
  assert step == 8
  trained = flatten(trained)
  imported = importers.read(weights, "timm").params
  locked = [k for k in imported if not k.startswith("img/head")]
  assert len(locked) > 10 and all(k in trained for k in locked)
  for key in locked:
    want = imported[key].reshape(trained[key].shape)
    np.testing.assert_array_equal(np.asarray(trained[key]), want, err_msg=key)
  # The trainable parts went on training after the resume: the new image head, the text tower.
  first = flatten(first)
  for key in ("img/head/kernel", "txt/embedding/embedding"):
    assert not np.array_equal(np.asarray(first[key]), np.asarray(trained[key])), key


def test_lit_locks_an_imported_resnet(data_dir, tmp_path):
  torchvision = pytest.importorskip("torchvision")
  torch.manual_seed(0)
  weights = str(tmp_path / "resnet18.pth")
  torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
  workdir = str(tmp_path / "run")
  result = launch(workdir, "tests/tiny_config.py:kind=lit_resnet",
                  f"--config.init.img.path={weights}", "--config.total_steps=3",
                  data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "(dino_resnet)" in result.stderr
  trained = flatten(state_lib.load_entry(workdir, "params", DEVICE)[0])
  imported = importers.read(weights).params
  locked = [k for k in imported if not k.startswith("img/head")]
  assert len(locked) > 50 and all(k in trained for k in locked)
  for key in locked:  # Convolutions and BatchNorm statistics alike.
    np.testing.assert_array_equal(np.asarray(trained[key]), imported[key], err_msg=key)
  assert trained["img/head/kernel"].shape == (512, 32)  # ResNet-18 features -> the text width.
