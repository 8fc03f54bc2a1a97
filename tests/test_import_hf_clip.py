"""Hugging Face CLIPModel import: embeddings equal transformers' own (random weights)."""

import numpy as np
import pytest

from agriclip_jax.models import importers
from agriclip_jax.models.importers import common
import importer_utils as utils

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, EOT, SOT = 99, 98, 97


def _clip_dir(path, act="quick_gelu", image_size=32):
  torch.manual_seed(0)
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                       hidden_act=act, bos_token_id=SOT, eos_token_id=EOT, pad_token_id=0),
      vision_config=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, image_size=image_size, patch_size=8,
                         hidden_act=act),
      projection_dim=24)
  model = transformers.CLIPModel(config).eval()
  with torch.no_grad():  # Non-trivial norms, biases and scale (init sets some to 1 / 0).
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(path)
  return model


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_hf_clip_embeddings_equal_transformers(tmp_path, act):
  reference = _clip_dir(tmp_path, act)
  assert importers.detect(str(tmp_path)) == "hf_clip"
  checkpoint = importers.read(str(tmp_path))
  images = utils.random_images(3, 32)
  tokens = utils.random_tokens(4, 16, VOCAB, EOT, sot=SOT)
  with torch.no_grad():
    want_img = reference.get_image_features(pixel_values=torch.from_numpy(images))
    want_txt = reference.get_text_features(input_ids=torch.from_numpy(tokens))
  want_img = getattr(want_img, "pooler_output", want_img).numpy()
  want_txt = getattr(want_txt, "pooler_output", want_txt).numpy()
  got_img, got_txt = utils.our_embeddings(checkpoint, images, tokens)
  np.testing.assert_allclose(got_img, want_img, atol=utils.ATOL, rtol=1e-4)
  np.testing.assert_allclose(got_txt, want_txt, atol=utils.ATOL, rtol=1e-4)
  np.testing.assert_allclose(checkpoint.model["logit_scale_init"],
                             float(reference.logit_scale.detach().exp()), rtol=1e-6)


def test_hf_clip_at_a_resampled_resolution_equals_transformers_interpolation(tmp_path):
  """224 -> 384-style resampling: our grid, resampled at import, equals transformers'
  bicubic `interpolate_pos_encoding` (PyTorch's kernel); the original size is untouched."""
  reference = _clip_dir(tmp_path)
  checkpoint = importers.read(str(tmp_path))
  images = utils.random_images(2, 48)  # 4x4 patches -> 6x6
  with torch.no_grad():
    want = reference.get_image_features(pixel_values=torch.from_numpy(images),
                                        interpolate_pos_encoding=True)
  want = getattr(want, "pooler_output", want).numpy()
  model, params = importers.build(checkpoint, image_size=48)
  assert params["img"]["pos_embedding"].shape == (1, 6, 6, 48)
  assert checkpoint.params["img/pos_embedding"].shape == (1, 4, 4, 48)
  got, _ = utils.our_embeddings(checkpoint, images)
  np.testing.assert_allclose(got, want, atol=utils.ATOL, rtol=1e-4)


def test_wrong_model_fails_with_one_line_naming_parameter_and_shapes(tmp_path):
  _clip_dir(tmp_path)
  checkpoint = importers.read(str(tmp_path))
  import jax  # pylint: disable=g-import-not-at-top
  target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in checkpoint.params.items()}
  target["img/encoder/block00/mlp/fc1/kernel"] = jax.ShapeDtypeStruct((48, 99), np.float32)
  with pytest.raises(common.CheckpointImportError) as error:
    common.fit(checkpoint, target, lambda k: True, "config.init.img")
  message = str(error.value)
  assert "\n" not in message
  assert "img/encoder/block00/mlp/fc1/kernel is (48, 64) in the checkpoint vs (48, 99)" in message


def _hf_clip_tokenizer_dir(path):
  """A real CLIP BPE saved by transformers' CLIPTokenizer, its vocabulary and merges built from
  the CLIP vocabulary file open_clip ships (the files openai/clip-* directories hold)."""
  import gzip  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  from agriclip_jax.input import clip_bpe  # pylint: disable=g-import-not-at-top
  bpe = clip_bpe.vocabulary_file()
  if bpe is None:
    pytest.skip("open_clip's packaged CLIP vocabulary is needed to build a real CLIP tokenizer")
  with gzip.open(bpe, "rt", encoding="utf-8") as f:
    merges = f.read().split("\n")[1:49152 - 256 - 2 + 1]
  byte_symbols = clip_bpe.byte_alphabet()
  vocab = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m.split()) for m in merges]
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
  (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
  tokenizer = transformers.CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
  out = path / "saved"
  tokenizer.save_pretrained(str(out))
  return out, tokenizer


def test_clip_tokenizer_ids_equal_transformers(tmp_path):
  """Our tokenizer read from a Hugging Face CLIP directory gives transformers' ids on a few
  hundred varied strings (sot ... eot; ours then pads with 0 where transformers repeats eot)."""
  from agriclip_jax.input import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  directory, reference = _hf_clip_tokenizer_dir(tmp_path)
  texts = utils.varied_texts()
  for length in (77, 16):
    ours = tokenizer_lib.from_pretrained(str(directory), length).encode(texts)
    want = np.asarray(reference(texts, padding="max_length", max_length=length,
                                truncation=True)["input_ids"])
    eot = reference.eos_token_id
    for text, got, row in zip(texts, ours, want):
      end = int(np.argmax(row[1:] == eot)) + 1  # The first eot after sot.
      expected = np.concatenate([row[:end + 1], np.zeros(length - end - 1, row.dtype)])
      np.testing.assert_array_equal(got, expected, err_msg=repr(text))
