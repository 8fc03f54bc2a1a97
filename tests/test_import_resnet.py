"""DINO ResNet import: features and logits equal torchvision's ResNet (random weights, BN
statistics that are not the identity), from bare and DINO-wrapped files."""

import argparse

import numpy as np
import pytest

from agriclip_jax.models import importers
from agriclip_jax.models import resnet
from agriclip_jax.models.importers import common
from agriclip_jax.pytree import flatten, unflatten
import importer_utils as utils

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
from torchvision.models.resnet import BasicBlock, Bottleneck  # pylint: disable=g-import-not-at-top

SIZE = 64  # ResNet-50 at 64 px: a 2x2 last stage, cheap on CPU.


def _randomised(model):
  """Running statistics measured on random images (so activations stay near unit scale
  through 16 blocks, where 1e-4 means something), then perturbed, with random BN affine
  parameters: torchvision's init makes eval-mode BN the identity, which would hide a swapped
  mean/var or scale/bias. Eval mode."""
  generator = torch.Generator().manual_seed(1)
  norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for module in norms:
      module.reset_running_stats()
      module.momentum = None  # A cumulative average: the statistics of this one batch.
      module.weight.copy_(0.5 + torch.rand(module.num_features, generator=generator))
      module.bias.copy_(0.1 * torch.randn(module.num_features, generator=generator))
    model.train()(torch.randn(8, 3, SIZE, SIZE, generator=generator))
    for block in model.modules():
      if isinstance(block, (Bottleneck, BasicBlock)):
        # Quieter residual branches, as trained ResNets have: with every scale near 1 a random
        # ResNet-50 is chaotic, and float32 itself (PyTorch's too) is then off by 4e-4.
        (block.bn3 if isinstance(block, Bottleneck) else block.bn2).weight.mul_(0.2)
    for module in norms:
      n = module.num_features
      module.running_mean.add_(0.1 * torch.randn(n, generator=generator)
                               * module.running_var.sqrt())
      module.running_var.mul_(0.8 + 0.4 * torch.rand(n, generator=generator))
  return model.eval()


@pytest.fixture(scope="module")
def reference():
  torch.manual_seed(0)
  return _randomised(torchvision.models.resnet50(weights=None))


def _features(model, images):
  """torchvision's `avgpool` output ([b, 2048]) and logits, from the same forward pass."""
  captured = {}
  hook = model.avgpool.register_forward_hook(
      lambda _, __, out: captured.update(pooled=out.flatten(1)))
  with torch.no_grad():
    logits = model(torch.from_numpy(images))
  hook.remove()
  return captured["pooled"].numpy(), logits.numpy()


def _dino_checkpoint(reference, student_scale=2.0):
  """A DINO training checkpoint: teacher and (different) student backbones under `module.
  backbone.`, a projection head under `module.head.`, and `args` as a Namespace."""
  backbone = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
  wrap = lambda scale: {**{f"module.backbone.{k}": v * (scale if v.is_floating_point() else 1)
                           for k, v in backbone.items()},
                        "module.head.mlp.0.weight": torch.zeros(8, 2048),
                        "module.head.last_layer.weight_g": torch.ones(16, 1)}
  return {"teacher": wrap(1.0), "student": wrap(student_scale), "epoch": 3,
          "args": argparse.Namespace(arch="resnet50", lr=0.03)}


def test_bare_state_dict_features_and_logits_equal_torchvision(tmp_path, reference):
  """`fc` is read as the optional classifier: pooled features and, when it is asked for,
  logits equal torchvision's."""
  import jax  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "dino_resnet50_pretrain.pth")
  torch.save(reference.state_dict(), path)
  assert importers.detect(path) == "dino_resnet"
  checkpoint = importers.read(path)
  assert checkpoint.model == {"img": {"arch": "resnet50"}}
  assert sorted(checkpoint.optional) == ["img/head/bias", "img/head/kernel"]
  model = resnet.Model(**resnet.tower_kwargs(checkpoint.model["img"], num_classes=1000))
  images = utils.random_images(2, SIZE)
  nhwc = images.transpose(0, 2, 3, 1)
  shapes = {"img": jax.eval_shape(model.init, jax.random.key(0), nhwc)["params"]}
  params = unflatten(common.fit(checkpoint, flatten(shapes), lambda k: True, "test",
                                optional=True))["img"]
  with jax.default_matmul_precision("highest"):
    logits, out = model.apply({"params": params}, nhwc)
  want_pooled, want_logits = _features(reference, images)
  assert out["pre_logits"].shape == (2, 2048)
  np.testing.assert_allclose(np.asarray(out["pre_logits"]), want_pooled, atol=utils.ATOL,
                             rtol=1e-4)
  np.testing.assert_allclose(np.asarray(logits), want_logits, atol=utils.ATOL, rtol=1e-4)


def test_dino_training_checkpoint_reads_the_teacher(tmp_path, reference):
  """Prefixes stripped, `head.` dropped, `args` (a Namespace) accepted, and the teacher's
  weights (not the student's) are the ones loaded; safetensors of the bare dict equal too."""
  path = str(tmp_path / "checkpoint.pth")
  torch.save(_dino_checkpoint(reference), path)
  assert importers.detect(path) == "dino_resnet"
  checkpoint = importers.read(path)
  assert not checkpoint.optional and not any("head" in k for k in checkpoint.params)
  safetensors_torch = pytest.importorskip("safetensors.torch")
  bare = str(tmp_path / "model.safetensors")
  safetensors_torch.save_file({k: v.contiguous() for k, v in reference.state_dict().items()},
                              bare)
  from_safetensors = importers.read(bare, "dino_resnet")
  assert from_safetensors.params.keys() == checkpoint.params.keys()
  for key, value in checkpoint.params.items():
    np.testing.assert_array_equal(value, from_safetensors.params[key], err_msg=key)
  images = utils.random_images(2, SIZE, seed=1)
  want, _ = _features(reference, images)
  got, _ = utils.our_embeddings(checkpoint, images)
  np.testing.assert_allclose(got, want, atol=utils.ATOL, rtol=1e-4)


def test_batch_norm_statistics_get_no_gradient():
  """Frozen BN: the running statistics in `params` are not moved by training, while its
  scale and bias are trained."""
  import jax  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  params = {k: rng.uniform(0.5, 1.5, size=4).astype(np.float32)
            for k in ("scale", "bias", "mean", "var")}
  x = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
  norm = resnet.FrozenBatchNorm()
  grads = jax.grad(lambda p: (norm.apply({"params": p}, x) ** 2).sum())(params)
  assert not np.any(grads["mean"]) and not np.any(grads["var"])
  assert np.all(grads["scale"] != 0) and np.all(grads["bias"] != 0)
  want = (x - params["mean"]) / np.sqrt(params["var"] + 1e-5) * params["scale"] + params["bias"]
  np.testing.assert_allclose(norm.apply({"params": params}, x), want, rtol=1e-5, atol=1e-6)


def test_resnet18_basic_blocks_equal_torchvision(tmp_path):
  torch.manual_seed(0)
  reference = _randomised(torchvision.models.resnet18(weights=None))
  path = str(tmp_path / "resnet18.pth")
  torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}},
             path)
  checkpoint = importers.read(path, "dino_resnet")
  assert checkpoint.model == {"img": {"arch": "resnet18"}}
  images = utils.random_images(2, SIZE)
  want, _ = _features(reference, images)
  got, _ = utils.our_embeddings(checkpoint, images)
  np.testing.assert_allclose(got, want, atol=utils.ATOL, rtol=1e-4)


def test_vit_checkpoint_fails_with_one_line(tmp_path):
  path = str(tmp_path / "dino_vits16.pth")
  torch.save({"cls_token": torch.zeros(1, 1, 8), "pos_embed": torch.zeros(1, 5, 8),
              "patch_embed.proj.weight": torch.zeros(8, 3, 16, 16),
              "blocks.0.attn.qkv.weight": torch.zeros(24, 8)}, path)
  assert not importers.module("dino_resnet").detect(path)
  with pytest.raises(common.CheckpointImportError) as error:
    importers.read(path, "dino_resnet")
  message = str(error.value)
  assert "\n" not in message
  assert "not a torchvision-layout ResNet" in message and "cls_token" in message


def test_wide_resnet_is_refused_with_one_line(tmp_path):
  path = str(tmp_path / "wide.pth")
  wide = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [1, 1, 1, 1],
                                          width_per_group=128)
  torch.save(wide.state_dict(), path)
  with pytest.raises(common.CheckpointImportError) as error:
    importers.read(path, "dino_resnet")
  assert "\n" not in str(error.value) and "wide or grouped" in str(error.value)
