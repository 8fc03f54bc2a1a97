"""Text tokenizers: a pretrained one from a directory, or a BPE trained on a dataset's captions.

Every tokenizer here produces fixed-length int32 rows laid out the same way:
`[sot] text... eot 0 0 ...` — id 0 is padding, the end-of-text token is always present (text is
truncated to make room for it) and is the last non-zero token, which is where the text tower
pools. SigLIP's tokenizer is the exception: its text tower attends to the padding (as it was
trained) and pools at the last position, so its rows are padded with SigLIP's own pad id
(`pad_id`, 1, the same id as its end-of-text token), exactly as its reference tokenizer pads.
"""

import glob
import json
import os
import re
import string
from typing import Iterable, Sequence

from absl import logging
import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from agriclip_jax import config_lib
from agriclip_jax import files
from agriclip_jax.input import pipeline

PAD, EOT, SOT = "<pad>", "<eot>", "<sot>"


class Tokenizer:
  """Wraps a `tokenizers.Tokenizer` with fixed-length, padded, EOT-terminated encoding."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, max_len: int, eot_id: int,
               sot_id: int | None = None, pad_id: int = 0):
    if eot_id == 0 and pad_id == 0:
      raise config_lib.ConfigError(
          "the tokenizer's end-of-text id is 0, which is reserved for padding")
    if max_len < 2 + (sot_id is not None):
      raise config_lib.ConfigError(f"max_len={max_len} leaves no room for text")
    self.tokenizer = tokenizer
    self.max_len = max_len
    self.eot_id = eot_id
    self.sot_id = sot_id
    self.pad_id = pad_id
    self.vocab_size = tokenizer.get_vocab_size()

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """int32 [len(texts), max_len]."""
    out = np.full((len(texts), self.max_len), self.pad_id, np.int32)
    head = [] if self.sot_id is None else [self.sot_id]
    room = self.max_len - len(head) - 1
    # SigLIP's reference does not append end-of-text to a text that already ends with it
    # (written out in the text); other tokenizers always append it.
    once = getattr(self.tokenizer, "eot_appended_once", False)
    for row, encoding in zip(out, self.tokenizer.encode_batch(list(texts),
                                                              add_special_tokens=False)):
      ids = head + encoding.ids[:room]
      if not (once and ids[-1:] == [self.eot_id]):
        ids.append(self.eot_id)
      row[:len(ids)] = ids
    return out

  def decode(self, ids: Sequence[int]) -> str:
    special = {self.pad_id, self.eot_id, self.sot_id}
    return self.tokenizer.decode([int(i) for i in ids if int(i) not in special])

  def save(self, directory: str) -> None:
    """tokenizer.json (or SigLIP's spiece.model) + tokenizer_layout.json in `directory` (what
    `load` reads back)."""
    files.path(directory).mkdir(parents=True, exist_ok=True)
    layout = {"max_len": self.max_len, "eot_id": self.eot_id, "sot_id": self.sot_id,
              "pad_id": self.pad_id}
    if isinstance(self.tokenizer, SiglipSentencePiece):
      layout["siglip_sentencepiece"] = self.tokenizer.save(directory)
    else:
      files.write_atomic(files.join(directory, "tokenizer.json"), self.tokenizer.to_str())
    files.write_json(files.join(directory, "tokenizer_layout.json"), layout, indent=None)


def load(directory: str) -> Tokenizer:
  """The tokenizer a run saved with `Tokenizer.save` (files saved before `pad_id` existed pad
  with 0, as they did then)."""
  layout = files.read_json(files.join(directory, "tokenizer_layout.json"))
  siglip = layout.pop("siglip_sentencepiece", None)
  if siglip is not None:
    tok = SiglipSentencePiece.load(directory, **siglip)
  else:
    tok = tokenizers.Tokenizer.from_str(
        files.path(directory).joinpath("tokenizer.json").read_text())
  return Tokenizer(tok, **layout)


def train_bpe(texts: Iterable[str], vocab_size: int) -> tokenizers.Tokenizer:
  """A byte-level, lower-casing BPE tokenizer with ids 0, 1, 2 = pad, eot, sot."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=[PAD, EOT, SOT], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer)
  return tok


def from_trained(tok: tokenizers.Tokenizer, max_len: int) -> Tokenizer:
  return Tokenizer(tok, max_len, eot_id=tok.token_to_id(EOT), sot_id=tok.token_to_id(SOT))


def from_pretrained(path: str, max_len: int) -> Tokenizer:
  """A Hugging Face tokenizer directory: tokenizer.json, SigLIP's SentencePiece model
  (spiece.model), or anything else AutoTokenizer reads.

  A SigLIP directory's rows are padded with its pad token (its text tower attends to the
  padding, as trained); every other tokenizer's with 0.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer directory {path} does not exist")
  json_path = os.path.join(path, "tokenizer.json")
  siglip = _is_siglip(path)
  config = _special_tokens_from_config(path)
  if os.path.exists(json_path):
    tok = tokenizers.Tokenizer.from_file(json_path)
  elif siglip:
    config = {**SIGLIP_SPECIAL_TOKENS, **config}
    tok = SiglipSentencePiece.from_directory(path, config)
  else:
    import transformers  # pylint: disable=g-import-not-at-top  (heavy; only for this case)
    hf = transformers.AutoTokenizer.from_pretrained(path)
    tok = hf.backend_tokenizer
    config = dict(eos_token=hf.eos_token, bos_token=hf.bos_token)
  eot = config.get("eos_token") or config.get("sep_token") or EOT
  sot = config.get("bos_token") or config.get("cls_token")
  eot_id = tok.token_to_id(eot)
  if eot_id is None:
    raise config_lib.ConfigError(f"tokenizer in {path} has no end-of-text token ({eot!r})")
  sot_id = tok.token_to_id(sot) if sot else None
  pad_id = 0
  if siglip and config.get("pad_token"):
    pad_id = tok.token_to_id(config["pad_token"])
    if pad_id is None:
      raise config_lib.ConfigError(
          f"tokenizer in {path} has no padding token ({config['pad_token']!r})")
  return Tokenizer(tok, max_len, eot_id=eot_id, sot_id=sot_id, pad_id=pad_id)


def _is_siglip(path: str) -> bool:
  """Whether the directory holds a SigLIP model or SigLIP's tokenizer."""
  for name, key in (("tokenizer_config.json", "tokenizer_class"), ("config.json", "model_type")):
    file = os.path.join(path, name)
    if os.path.isfile(file):
      with open(file) as f:
        value = json.load(f).get(key) or ""
      if value:
        return value.lower().startswith("siglip")
  return False


def _special_tokens_from_config(path: str) -> dict:
  out = {}
  for name in ("special_tokens_map.json", "tokenizer_config.json"):
    for p in glob.glob(os.path.join(path, name)):
      with open(p) as f:
        for k, v in json.load(f).items():
          if k.endswith("_token") and v is not None:
            out.setdefault(k, v["content"] if isinstance(v, dict) else v)
  return out


# SigLIP's tokenizer's special tokens where its files do not name them.
SIGLIP_SPECIAL_TOKENS = dict(eos_token="</s>", unk_token="<unk>", pad_token="</s>")
WORD_START = "\u2581"  # SentencePiece's mark of a word's start ("▁").


class _Ids:
  """One text's ids, shaped like the `tokenizers.Encoding` that `Tokenizer` reads."""
  __slots__ = ("ids",)

  def __init__(self, ids: list[int]):
    self.ids = ids


class SiglipSentencePiece:
  """SigLIP's text tokenization over its SentencePiece model, id for id as Hugging Face's
  `SiglipTokenizer` does it (the reference SiglipModel checkpoints are used with), with the
  `tokenizers.Tokenizer` methods that `Tokenizer` calls.

  SigLIP's `canonicalize_text` is what makes it differ from plain SentencePiece: special-token
  strings ("</s>") are split out of the text first and kept as their ids; each other part is
  lower-cased, stripped of ASCII punctuation, its whitespace runs collapsed and its ends
  stripped; only the text's first part starts with a word mark (so leading whitespace leaves a
  lone "▁" piece, and a part after a special token starts mid-word), which SentencePiece sees
  after an "<unk>" prefix that is then dropped. Needs the `sentencepiece` package.
  """
  eot_appended_once = True  # The reference does not append "</s>" to a text ending with it.

  def __init__(self, model: bytes, special: dict[str, int], lower_case: bool = True,
               unk_token: str = "<unk>"):
    try:
      import sentencepiece  # pylint: disable=g-import-not-at-top  (SigLIP tokenizers only)
    except ImportError:
      raise config_lib.ConfigError("SigLIP's tokenizer needs the sentencepiece package "
                                   "(pip install sentencepiece)") from None
    self.model = model
    self.processor = sentencepiece.SentencePieceProcessor(model_proto=model)
    self.special = dict(special)
    self.lower_case = lower_case
    self.unk_token = unk_token
    self._unk_length = len(self.processor.encode(unk_token, out_type=str))
    longest_first = sorted(self.special, key=len, reverse=True)
    self._special_pattern = (re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")
                             if longest_first else None)
    self._no_punctuation = str.maketrans("", "", string.punctuation)

  @classmethod
  def from_directory(cls, path: str, config: dict) -> "SiglipSentencePiece":
    """From spiece.model and the special tokens and casing of tokenizer_config.json."""
    model_path = os.path.join(path, "spiece.model")
    if not os.path.isfile(model_path):
      raise config_lib.ConfigError(f"{path}: a SigLIP directory without spiece.model or "
                                   "tokenizer.json has no tokenizer")
    with open(model_path, "rb") as f:
      model = f.read()
    settings = {}
    config_path = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(config_path):
      with open(config_path) as f:
        settings = json.load(f)
    # Added tokens and the named special tokens are split out of texts before anything else.
    special = {token["content"]: int(token_id)
               for token_id, token in settings.get("added_tokens_decoder", {}).items()}
    names = [v for k, v in config.items() if k.endswith("_token")]
    for key in ("additional_special_tokens", "extra_special_tokens"):
      if isinstance(settings.get(key), list):
        names += settings[key]
    probe = cls(model, {})
    for token in names:
      token = token["content"] if isinstance(token, dict) else token
      if token not in special:
        token_id = probe.token_to_id(token)
        if token_id is None:
          raise config_lib.ConfigError(f"{path}: special token {token!r} is not in spiece.model")
        special[token] = token_id
    return cls(model, special, lower_case=settings.get("do_lower_case", True),
               unk_token=config.get("unk_token", "<unk>"))

  def _part_pieces(self, part: str) -> list[str]:
    """SentencePiece pieces of one canonicalised part of a text."""
    if self.lower_case:
      part = part.lower()
    part = re.sub(r"\s+", " ", part.translate(self._no_punctuation)).strip()
    pieces = self.processor.encode(self.unk_token + part, out_type=str)
    return pieces[self._unk_length:] if len(pieces) >= self._unk_length else pieces

  def _encode(self, text: str) -> list[int]:
    text = WORD_START + text.replace(WORD_START, " ")
    parts = self._special_pattern.split(text) if self._special_pattern else [text]
    pieces = []
    for part in parts:
      if part in self.special:
        pieces.append(part)
      elif part:
        pieces.extend(self._part_pieces(part))
    if len(pieces) > 1 and pieces[0] == WORD_START and pieces[1] in self.special:
      pieces = pieces[1:]  # A text that starts with a special token has no lone word mark.
    return [self.special[p] if p in self.special else self.processor.piece_to_id(p)
            for p in pieces]

  def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[_Ids]:
    del add_special_tokens  # `Tokenizer` lays out the special tokens itself.
    return [_Ids(self._encode(text)) for text in texts]

  def get_vocab_size(self) -> int:
    return max([self.processor.get_piece_size()] + [i + 1 for i in self.special.values()])

  def token_to_id(self, token: str) -> int | None:
    if token in self.special:
      return self.special[token]
    token_id = self.processor.piece_to_id(token)
    return token_id if self.processor.id_to_piece(token_id) == token else None

  def decode(self, ids: Sequence[int]) -> str:
    size = self.processor.get_piece_size()
    return self.processor.decode([int(i) for i in ids if 0 <= int(i) < size])

  def save(self, directory: str) -> dict:
    """Writes spiece.model; returns the rest of the settings, for `load`."""
    files.write_atomic(files.join(directory, "spiece.model"), self.model)
    return dict(special=self.special, lower_case=self.lower_case, unk_token=self.unk_token)

  @classmethod
  def load(cls, directory: str, **settings) -> "SiglipSentencePiece":
    return cls(files.path(directory).joinpath("spiece.model").read_bytes(), **settings)


def trained_on_captions(sources, path: str, vocab_size: int, max_len: int,
                        max_examples: int = 200_000) -> Tokenizer:
  """A BPE trained on the texts of [(source, text_key)], saved at (and reloaded from) `path`.

  Up to `max_examples` examples in all are read, spread evenly over each source.
  """
  if not files.path(path).exists():
    per_source = max(1, max_examples // len(sources))
    logging.info("Training a %d-token BPE on up to %d examples' texts -> %s", vocab_size,
                 per_source * len(sources), path)
    texts = (text for source, key in sources for text in _texts(source, per_source, key))
    # Atomic: concurrent processes never read half a file.
    files.write_atomic(path, train_bpe(texts, vocab_size).to_str())
  return from_trained(tokenizers.Tokenizer.from_str(files.path(path).read_text()), max_len)


def _texts(source, n: int, text_key: str):
  """Every text of `n` examples spread over `source` (lists and dicts of texts expanded)."""
  n = min(n, len(source))
  step = max(1, len(source) // n)
  for i in range(0, step * n, step):
    value = pipeline.feature(source[i], text_key)
    if isinstance(value, dict):
      value = list(value.values())
    for text in (value if isinstance(value, (list, tuple, np.ndarray)) else [value]):
      yield text.decode() if isinstance(text, bytes) else str(text)
