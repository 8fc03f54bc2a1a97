"""Shared by the importer parity tests: random inputs and our embeddings of them."""

import json
import random

import numpy as np

from agriclip_jax.input import tokenizer as tokenizer_lib
from agriclip_jax.models import importers

ATOL = 1e-4


def random_images(n: int, size: int, seed: int = 0) -> np.ndarray:
  """Normalised-looking float32 images, NCHW (what PyTorch models take)."""
  return np.random.default_rng(seed).normal(size=(n, 3, size, size)).astype(np.float32)


def random_tokens(n: int, length: int, vocab: int, eot: int, seed: int = 0,
                  sot: int | None = None) -> np.ndarray:
  """Rows laid out as our tokenizers do: [sot] text... eot 0 0 ... (ids in [1, eot))."""
  rng = np.random.default_rng(seed)
  out = np.zeros((n, length), np.int64)
  for row in out:
    ids = ([] if sot is None else [sot]) + list(rng.integers(1, min(eot, vocab), size=rng.integers(
        1, length - 1 - (sot is not None) + 1))) + [eot]
    row[:len(ids)] = ids[:length - 1] + [eot] if len(ids) > length else ids
  return out


def normalize(x) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def our_embeddings(checkpoint, images_nchw=None, tokens=None):
  """(image embeddings, text embeddings), unnormalised, from our model of `checkpoint`."""
  import jax  # pylint: disable=g-import-not-at-top
  with jax.default_matmul_precision("highest"):
    size = None if images_nchw is None else images_nchw.shape[-1]
    model, params = importers.build(checkpoint, image_size=size)
    images = None if images_nchw is None else images_nchw.transpose(0, 2, 3, 1)
    if "txt" not in checkpoint.model:
      return np.asarray(model.apply({"params": params}, images)[0]), None
    zimg, ztxt, extras = model.apply({"params": params}, images,
                                     None if tokens is None else tokens.astype(np.int32))
    out_img = None if zimg is None else np.asarray(zimg) * np.asarray(extras["img/norm"])[:, None]
    out_txt = None if ztxt is None else np.asarray(ztxt) * np.asarray(extras["txt/norm"])[:, None]
    return out_img, out_txt


def hf_clip_with_tokenizer(path, width=32):
  """A random CLIP in Hugging Face's format, with a tokenizer of its own (ids 1 and 2 are its
  end- and start-of-text tokens, as in our BPE's layout)."""
  path.mkdir()
  tok = tokenizer_lib.train_bpe([f"a {c} {s} {k}" for c in ("red", "green", "blue", "white")
                                 for s in ("spotted", "plain") for k in ("leaf", "cow")], 300)
  tok.save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": tokenizer_lib.SOT, "eos_token": tokenizer_lib.EOT}))
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  tower = dict(hidden_size=width, intermediate_size=64, num_hidden_layers=1,
               num_attention_heads=2)
  config = transformers.CLIPConfig(
      text_config=dict(tower, vocab_size=tok.get_vocab_size(), max_position_embeddings=16,
                       bos_token_id=2, eos_token_id=1, pad_token_id=0),
      vision_config=dict(tower, image_size=32, patch_size=8), projection_dim=32)
  model = transformers.CLIPModel(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(path)
  return model


def varied_texts(n: int = 300) -> list[str]:
  """Captions and noise: accents, scripts, emoji (ZWJ, flags, tags), curly quotes, HTML
  entities, ligatures, full-width forms, control characters, Greek final sigma, long texts."""
  fixed = [
      "", " ", "a photo of a cow", "A Photo Of A COW!!!", "Holstein–Friesian cattle, grazing.",
      "café crème brûlée", "cafe\u0301 naïve façade Ærøskøbing", "ΟΔΟΣ ΣΑΣ ελληνικά", "İstanbul",
      "🐄🐑🌾 farm 🚜", "👩🏽‍🌾 farmer", "🏴󠁧󠁢󠁳󠁣󠁴󠁿 flag", "don't can't we're I've I'm you'll he'd",
      "It’s the farmer’s “best” crop", "tom &amp; jerry &lt;3 &quot;q&quot; &#39;x&#39;",
      "&amp;amp;lt;", "ﬁeld ﬂower ﬀ ﬃ ﬄ ﬅ ﬆ", "ＦＵＬＬＷＩＤＴＨ　ｔｅｘｔ，（ok）",
      "tabs\tand\nnewlines\r\nand\xa0nbsp\u2003em", "\x1b[31mred\x1b[0m text", "zero\u200bwidth",
      "ctrl\x07char", "数字 123 4567 ½ ² Ⅻ", "日本語のテキスト、です。", "한국어 텍스트",
      "Привет, мир!", "مرحبا بالعالم", "हिन्दी पाठ", "<start_of_text> inside <end_of_text>",
      "e-mail: a.b@c.com http://x.org/y?z=1", "$100.00 #tag @user 50% off", "...!!!???",
      "Quercus robur L.", "x" * 300, "word " * 100, "ǅemal Ĳssel ŉ", "Straße", "ᾼ aͅb _ͅ!",
  ]
  pieces = ["cow", "Sheep", "WHEAT", "maïs", "épi", "leaf-rust", "Ω", "ß", "ﬁ", "’", "“", "&amp;",
            "🙂", "🐝", "42", "3.14", ",", "!", "?", "...", "(", ")", "'s", "'LL", "\t", "  ", "\n",
            "中文", "ñandú", "Ǆ", "ＡＢＣ", "ｶﾀｶﾅ", "\u0301", "ΣΑΣ", "x\xa0y", "<", ">", "_", "-",
            "/", "don't", "#", "Ĳ", "\ufeff", "\u2028", "Ⅷ", "٣", "œuvre", "Æ", "D:Σ"]
  rng = random.Random(0)
  texts = list(fixed)
  while len(texts) < n:
    texts.append("".join(rng.choice(pieces) + rng.choice(["", " ", " "])
                         for _ in range(rng.randint(1, 120 if len(texts) % 10 == 0 else 30))))
  return texts
