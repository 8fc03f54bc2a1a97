"""Hugging Face SiglipModel import and SigLIP's tokenizer: embeddings equal transformers' own
(random weights) and token ids equal transformers' SiglipTokenizer's."""

import json
import random
import string

import numpy as np
import pytest

from agriclip_jax.input import tokenizer as tokenizer_lib
from agriclip_jax.models import importers
from agriclip_jax.models.importers import common
import importer_utils as utils

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

VOCAB, PAD, UNK = 256, 1, 2  # SigLIP's layout: pad = eos = 1 ("</s>"), unk = 2.

WORDS = ("a photo of the cat dog leaf cattle fish red green spotted striped wheat maize rice "
         "blight rust disease healthy sheep goat chicken bee flower café naïve résumé über "
         "straße Ångström 日本 🌾").split()


def _corpus(rng: random.Random) -> list[str]:
  """Captions over the words above and a few hundred invented ones (enough for 256 pieces)."""
  syllables = "ka ri to ne mu sa lo pi de vu ch st gr ea ou".split()
  words = list(WORDS) + ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4)))
                         for _ in range(400)]
  return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(3000)]


@pytest.fixture(scope="module")
def spiece_model(tmp_path_factory) -> str:
  """A small unigram SentencePiece model with T5's / SigLIP's special ids."""
  directory = tmp_path_factory.mktemp("spiece")
  corpus = directory / "corpus.txt"
  corpus.write_text("\n".join(_corpus(random.Random(0))))
  spm.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(directory / "m"), vocab_size=VOCAB,
      model_type="unigram", pad_id=0, eos_id=PAD, unk_id=UNK, bos_id=-1,
      character_coverage=0.995, minloglevel=2)
  return str(directory / "m.model")


def _siglip_dir(path, spiece_model=None, text_width=32, image_size=32):
  torch.manual_seed(0)
  config = transformers.SiglipConfig(
      text_config=dict(vocab_size=VOCAB, hidden_size=text_width, intermediate_size=40,
                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                       projection_size=48, pad_token_id=PAD, eos_token_id=PAD, bos_token_id=None),
      vision_config=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, image_size=image_size, patch_size=8))
  model = transformers.SiglipModel(config).eval()
  with torch.no_grad():  # Non-trivial norms, biases, scale and bias (init sets some to 1 / 0).
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(path)
  if spiece_model:
    transformers.SiglipTokenizer(spiece_model, model_max_length=16).save_pretrained(path)
  return model


def _padded_tokens(n: int, length: int, seed: int = 0) -> np.ndarray:
  """Rows as SigLIP feeds them: text ids, eos, then pad (= eos) up to the full length."""
  rng = np.random.default_rng(seed)
  out = np.full((n, length), PAD, np.int64)
  for row in out:
    ids = rng.integers(3, VOCAB, size=rng.integers(0, length))
    row[:len(ids)] = ids
  return out


def _features(output) -> np.ndarray:
  return getattr(output, "pooler_output", output).numpy()


@pytest.mark.parametrize("text_width", [32, 48])
def test_hf_siglip_embeddings_equal_transformers(tmp_path, text_width):
  reference = _siglip_dir(tmp_path, text_width=text_width)
  assert importers.detect(str(tmp_path)) == "hf_siglip"
  checkpoint = importers.read(str(tmp_path))
  assert checkpoint.model["out_dim"] == 48 and checkpoint.context_length == 16
  assert checkpoint.params["img/map_head/probe"].shape == (1, 1, 48)
  images = utils.random_images(3, 32)
  tokens = _padded_tokens(4, 16)
  with torch.no_grad():  # No attention mask: SigLIP attends to the padding, as trained.
    want_img = _features(reference.get_image_features(pixel_values=torch.from_numpy(images)))
    want_txt = _features(reference.get_text_features(input_ids=torch.from_numpy(tokens)))
  got_img, got_txt = utils.our_embeddings(checkpoint, images, tokens)
  np.testing.assert_allclose(got_img, want_img, atol=utils.ATOL, rtol=1e-4)
  np.testing.assert_allclose(got_txt, want_txt, atol=utils.ATOL, rtol=1e-4)
  np.testing.assert_allclose(checkpoint.model["logit_scale_init"],
                             float(reference.logit_scale.detach().exp()), rtol=1e-6)
  np.testing.assert_allclose(checkpoint.model["logit_bias_init"],
                             float(reference.logit_bias.detach()), rtol=1e-6)
  _, params = importers.build(checkpoint)
  np.testing.assert_allclose(params["logit_bias"], float(reference.logit_bias.detach()),
                             rtol=1e-6)


def test_hf_siglip_at_a_resampled_resolution_equals_transformers_interpolation(tmp_path):
  """SigLIP's `interpolate_pos_encoding` is PyTorch's bicubic (align_corners=False), the
  kernel our import-time resampling reproduces; the original grid is untouched."""
  reference = _siglip_dir(tmp_path)
  checkpoint = importers.read(str(tmp_path))
  images = utils.random_images(2, 48)  # 4x4 patches -> 6x6
  with torch.no_grad():
    want = _features(reference.get_image_features(pixel_values=torch.from_numpy(images),
                                                  interpolate_pos_encoding=True))
  _, params = importers.build(checkpoint, image_size=48)
  assert params["img"]["pos_embedding"].shape == (1, 6, 6, 48)
  assert checkpoint.params["img/pos_embedding"].shape == (1, 4, 4, 48)
  got, _ = utils.our_embeddings(checkpoint, images)
  np.testing.assert_allclose(got, want, atol=utils.ATOL, rtol=1e-4)


def test_imported_tokenizer_pads_with_siglip_pad_id_and_embeds_like_transformers(
    tmp_path, spiece_model):
  reference = _siglip_dir(tmp_path, spiece_model)
  checkpoint = importers.read(str(tmp_path))
  tokenizer = checkpoint.tokenizer(checkpoint.context_length)
  assert (tokenizer.pad_id, tokenizer.eot_id, tokenizer.sot_id) == (PAD, PAD, None)
  texts = ["a photo of a spotted cat", "", "Wheat RUST, on a leaf!", "sheep " * 20]
  tokens = tokenizer.encode(texts)
  ref_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  want_tokens = ref_tokenizer(texts, padding="max_length", max_length=16, truncation=True,
                              return_tensors="np")["input_ids"]
  np.testing.assert_array_equal(tokens, want_tokens)
  assert tokens[1].tolist() == [PAD] * 16
  with torch.no_grad():
    want = _features(reference.get_text_features(input_ids=torch.from_numpy(want_tokens)))
  _, got = utils.our_embeddings(checkpoint, None, tokens)
  np.testing.assert_allclose(got, want, atol=utils.ATOL, rtol=1e-4)


def _varied_texts(n: int, seed: int = 0) -> list[str]:
  """Hand-picked edge cases and random strings: unicode, accents, emoji, punctuation, special
  token strings, whitespace runs, SentencePiece's own word mark, long and empty."""
  rng = random.Random(seed)
  texts = [
      "", " ", "   ", "a photo of a cat", "  Hello,  World!  ", "A </s> b", "</s>", "</s> leaf",
      "leaf </s>", "wheat rust</s>", "<unk>", "x<unk>y", "Café naïve RÉSUMÉ", "über straße",
      "🌾 wheat 🐄", "\u2581leaf\u2581 \u2581", "tab\tnew\nline\r\n", "ÅNGSTRÖM", "İstanbul Σίσυφος",
      "…—“quotes”", "full－width　space", "ﬁ ligature ①", "\u200b zero\u200dwidth",
      "a.b,c;d:e!f?g", "snake_case-words", "(parenthesised) [bracket] {brace}", "日本語",
      "mixed 123 456.78 numbers", "leaf " * 80, "x" * 300, "\u00a0non-breaking\u00a0",
  ]
  alphabet = list(string.ascii_letters + string.digits + string.punctuation + " \t\n"
                  + "éèüößçñÅΣ日本🌾🐄\u2581\u3000\u00a0ﬁ①")
  words = list(WORDS) + ["</s>", "<unk>", "  ", "Spotted", "STRIPED", "Blight!"]
  while len(texts) < n:
    if rng.random() < 0.4:
      texts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80))))
    else:
      texts.append(" ".join(rng.choice(words) for _ in range(rng.randint(0, 40))))
  return texts


def test_siglip_tokenizer_ids_equal_transformers(tmp_path, spiece_model):
  reference = transformers.SiglipTokenizer(spiece_model)
  reference.save_pretrained(tmp_path)
  ours = tokenizer_lib.from_pretrained(str(tmp_path), 64)
  assert isinstance(ours.tokenizer, tokenizer_lib.SiglipSentencePiece)
  assert ours.pad_id == PAD and ours.vocab_size == VOCAB
  texts = _varied_texts(400)
  want = reference(texts, padding="max_length", max_length=64, truncation=True)["input_ids"]
  got = ours.encode(texts)
  mismatched = [t for t, w, g in zip(texts, want, got) if list(w) != g.tolist()]
  assert not mismatched, f"{len(mismatched)} texts differ, e.g. {mismatched[:3]}"
  assert ours.decode(got[3]) == "a photo of a cat"
  # A run saves the tokenizer in its workdir and reloads it with the same ids and padding.
  ours.save(str(tmp_path / "run"))
  again = tokenizer_lib.load(str(tmp_path / "run"))
  assert again.pad_id == PAD
  np.testing.assert_array_equal(again.encode(texts), got)


def test_layout_without_pad_id_loads_padding_with_zero(tmp_path):
  """Tokenizers saved before `pad_id` existed keep padding with 0."""
  tok = tokenizer_lib.from_trained(tokenizer_lib.train_bpe(["red leaf", "green fish"] * 5, 300),
                                   16)
  tok.save(str(tmp_path))
  layout_path = tmp_path / "tokenizer_layout.json"
  layout = json.loads(layout_path.read_text())
  assert layout.pop("pad_id") == 0
  layout_path.write_text(json.dumps(layout))
  loaded = tokenizer_lib.load(str(tmp_path))
  row = loaded.encode(["red leaf"])[0]
  assert loaded.pad_id == 0 and row[-1] == 0
  assert row[np.flatnonzero(row)[-1]] == loaded.eot_id


def test_siglip2_naflex_is_refused_in_one_line(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip2"}))
  assert importers.detect(str(tmp_path)) == "hf_siglip"
  with pytest.raises(common.CheckpointImportError) as error:
    importers.read(str(tmp_path))
  assert "\n" not in str(error.value) and "siglip2" in str(error.value)
