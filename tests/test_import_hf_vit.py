"""Hugging Face ViT import (`ViTModel`, `ViTForImageClassification`): every token and the
class-token output equal transformers' own (random weights), at the checkpoint's resolution and
resampled; the classifier is an optional head with HF's logits."""

import numpy as np
import pytest

from agriclip_jax.models import importers
import importer_utils as utils

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SIZE, PATCH, WIDTH = 32, 8, 48  # A 4x4 grid, so resampling has something to interpolate.


def _save(path, model_class=None, **overrides):
  """A small random ViT with every weight perturbed (biases and norms too) and position
  embeddings large enough that resampling them changes the output."""
  torch.manual_seed(0)
  config = transformers.ViTConfig(hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, image_size=SIZE, patch_size=PATCH,
                                  **overrides)
  model = (model_class or transformers.ViTModel)(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.add_((0.5 if "position_embeddings" in name else 0.05) * torch.randn_like(p))
  model.save_pretrained(path)
  return model


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("hf_vit")
  return _save(path), str(path)


def _ours(checkpoint, images_nchw):
  import jax  # pylint: disable=g-import-not-at-top
  with jax.default_matmul_precision("highest"):
    model, params = importers.build(checkpoint, image_size=images_nchw.shape[-1])
    pooled, extras = jax.jit(model.apply)({"params": params}, images_nchw.transpose(0, 2, 3, 1))
  return np.asarray(pooled), np.asarray(extras["encoded"]), params


def _check(checkpoint, reference, images):
  got_pooled, got_tokens, params = _ours(checkpoint, images)
  with torch.no_grad():
    want = reference(pixel_values=torch.from_numpy(images),
                     interpolate_pos_encoding=images.shape[-1] != SIZE).last_hidden_state.numpy()
  assert got_tokens.shape == want.shape
  np.testing.assert_allclose(got_tokens, want, atol=utils.ATOL, rtol=1e-4)
  np.testing.assert_allclose(got_pooled, want[:, 0], atol=utils.ATOL, rtol=1e-4)
  return got_pooled, params


def test_hf_vit_tokens_equal_transformers(vit_dir):
  reference, path = vit_dir
  assert importers.detect(path) == "hf_vit"
  checkpoint = importers.read(path)
  img = checkpoint.model["img"]
  assert (img["width"], img["depth"], img["mlp_dim"], img["patch_size"]) == (WIDTH, 2, 96, PATCH)
  assert img["layer_norm_eps"] == 1e-12 and checkpoint.image_size == SIZE
  assert checkpoint.mean == (0.5, 0.5, 0.5)
  assert not any("pooler" in k or "mask" in k for k in checkpoint.params)
  _check(checkpoint, reference, utils.random_images(2, SIZE))


@pytest.mark.parametrize("size", [48, 24])  # 4x4 grid -> 6x6 and 3x3.
def test_hf_vit_resampled_equals_transformers_interpolation(vit_dir, size):
  reference, path = vit_dir
  checkpoint = importers.read(path)
  original = checkpoint.params["img/pos_embedding"].copy()
  _, params = _check(checkpoint, reference, utils.random_images(2, size, seed=1))
  assert params["pos_embedding"].shape == (1, size // PATCH, size // PATCH, WIDTH)
  np.testing.assert_array_equal(checkpoint.params["img/pos_embedding"], original)


def test_classification_directory_without_qkv_bias_keeps_its_head_optional(tmp_path):
  """ViTForImageClassification reads as its backbone (`vit.` prefix); its classifier is the
  optional head, giving HF's logits; qkv_bias=False reads as zero biases."""
  reference = _save(tmp_path, transformers.ViTForImageClassification, qkv_bias=False,
                    num_labels=5)
  checkpoint = importers.read(str(tmp_path))
  assert set(checkpoint.optional) == {"img/head/kernel", "img/head/bias"}
  images = utils.random_images(2, SIZE)
  pooled, _ = _check(checkpoint, reference.vit, images)
  with torch.no_grad():
    want = reference(pixel_values=torch.from_numpy(images)).logits.numpy()
  got = pooled @ checkpoint.optional["img/head/kernel"] + checkpoint.optional["img/head/bias"]
  np.testing.assert_allclose(got, want, atol=utils.ATOL, rtol=1e-4)
