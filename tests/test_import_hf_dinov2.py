"""Hugging Face DINOv2 import: pooled output and every token equal transformers' own (random
weights), at the checkpoint's resolution and resampled up and down."""

import numpy as np
import pytest

from agriclip_jax.models import importers
from agriclip_jax.models.importers import common
from agriclip_jax.models.importers import resample
import importer_utils as utils

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SIZE, PATCH, WIDTH = 56, 14, 48  # A 4x4 grid, so resampling has something to interpolate.
FAMILIES = {
    "dinov2": (transformers.Dinov2Config, transformers.Dinov2Model, {}),
    "dinov2_with_registers": (transformers.Dinov2WithRegistersConfig,
                              transformers.Dinov2WithRegistersModel,
                              dict(num_register_tokens=4)),
}


def _save(path, family, model_class=None, **overrides):
  """A small random model of `family`, with every weight (LayerScale included) perturbed and
  position embeddings large enough that resampling them changes the output."""
  torch.manual_seed(0)
  config_class, default_class, extra = FAMILIES[family]
  config = config_class(hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=4,
                        image_size=SIZE, patch_size=PATCH, layerscale_value=0.5,
                        **extra, **overrides)
  model = (model_class or default_class)(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.add_((0.5 if "position_embeddings" in name else 0.05) * torch.randn_like(p))
  model.save_pretrained(path)
  return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_dir(request, tmp_path_factory):
  path = tmp_path_factory.mktemp(request.param)
  return request.param, _save(path, request.param), str(path)


def _ours(checkpoint, images_nchw):
  """(pooled, encoded tokens, params) of our model of `checkpoint` at the images' size."""
  import jax  # pylint: disable=g-import-not-at-top
  with jax.default_matmul_precision("highest"):
    model, params = importers.build(checkpoint, image_size=images_nchw.shape[-1])
    # One compiled program, not one per operation: much faster than eager on CPU.
    pooled, extras = jax.jit(model.apply)({"params": params}, images_nchw.transpose(0, 2, 3, 1))
  return np.asarray(pooled), np.asarray(extras["encoded"]), params


def _reference(model, images_nchw):
  with torch.no_grad():
    out = model(pixel_values=torch.from_numpy(images_nchw))
  return out.pooler_output.numpy(), out.last_hidden_state.numpy()


def _assert_equal_outputs(checkpoint, reference, images):
  got_pooled, got_tokens, params = _ours(checkpoint, images)
  want_pooled, want_tokens = _reference(reference, images)
  assert got_tokens.shape == want_tokens.shape  # [cls, registers, patches] in both.
  np.testing.assert_allclose(got_pooled, want_pooled, atol=utils.ATOL, rtol=1e-4)
  np.testing.assert_allclose(got_tokens, want_tokens, atol=utils.ATOL, rtol=1e-4)
  return params


def test_hf_dinov2_tokens_equal_transformers(family_dir):
  family, reference, path = family_dir
  assert importers.detect(path) == "hf_dinov2"
  checkpoint = importers.read(path)
  registers = 4 if family == "dinov2_with_registers" else 0
  assert checkpoint.model["img"].get("num_registers", 0) == registers
  assert checkpoint.model["img"]["mlp_dim"] == 4 * WIDTH
  assert checkpoint.image_size == SIZE
  assert not any("mask" in k for k in checkpoint.params)
  _assert_equal_outputs(checkpoint, reference, utils.random_images(2, SIZE))


@pytest.mark.parametrize("size", [84, 42])  # 4x4 grid -> 6x6 and 3x3.
def test_hf_dinov2_resampled_equals_transformers_interpolation(family_dir, size):
  """Resampled at import, our grid equals HF's run-time bicubic one: plain for Dinov2Model,
  antialiased for Dinov2WithRegistersModel; the checkpoint's own grid is untouched."""
  _, reference, path = family_dir
  checkpoint = importers.read(path)
  original = checkpoint.params["img/pos_embedding"].copy()
  params = _assert_equal_outputs(checkpoint, reference, utils.random_images(2, size, seed=1))
  grid = size // PATCH
  assert params["pos_embedding"].shape == (1, grid, grid, WIDTH)
  np.testing.assert_array_equal(checkpoint.params["img/pos_embedding"], original)
  assert original.shape == (1, SIZE // PATCH, SIZE // PATCH, WIDTH)


@pytest.mark.parametrize("shape", [(4, 4, 6, 6), (4, 4, 3, 3), (37, 37, 16, 16),
                                   (5, 7, 12, 3), (16, 16, 37, 37)])
def test_antialiased_resampling_equals_torch(shape):
  gh, gw, height, width = shape
  grid = np.random.default_rng(0).normal(size=(1, gh, gw, 5))
  want = torch.nn.functional.interpolate(
      torch.from_numpy(grid.transpose(0, 3, 1, 2)), size=(height, width), mode="bicubic",
      align_corners=False, antialias=True).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(resample.antialiased_resample_grid(grid, height, width), want,
                             atol=1e-12)
  plain = resample.resample_grid(grid, height, width)  # The kernels do differ.
  assert np.abs(plain - want).max() > 1e-3


def test_qkv_without_bias_and_classification_directory(tmp_path):
  """qkv_bias=False reads as zero biases; Dinov2ForImageClassification reads as its backbone
  (the `dinov2.` prefix stripped, the classifier dropped)."""
  reference = _save(tmp_path, "dinov2", transformers.Dinov2ForImageClassification,
                    qkv_bias=False, num_labels=3)
  checkpoint = importers.read(str(tmp_path))
  assert not any("classifier" in k for k in checkpoint.params)
  _assert_equal_outputs(checkpoint, reference.dinov2, utils.random_images(2, SIZE))


def test_swiglu_checkpoint_is_refused_in_one_line(tmp_path):
  _save(tmp_path, "dinov2", use_swiglu_ffn=True)
  with pytest.raises(common.CheckpointImportError) as error:
    importers.read(str(tmp_path))
  message = str(error.value)
  assert "\n" not in message
  assert "SwiGLU" in message and "mlp.weights_in" in message
