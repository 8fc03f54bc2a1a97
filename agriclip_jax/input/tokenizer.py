"""Text tokenizers: a pretrained one from a directory, or a BPE trained on a dataset's captions.

Every tokenizer here produces fixed-length int32 rows laid out the same way:
`[sot] text... eot 0 0 ...` — id 0 is padding, the end-of-text token is always present (text is
truncated to make room for it) and is the last non-zero token, which is where the text tower
pools.
"""

import glob
import json
import os
from typing import Iterable, Sequence

from absl import logging
import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from agriclip_jax import config_lib
from agriclip_jax.input import pipeline

PAD, EOT, SOT = "<pad>", "<eot>", "<sot>"


class Tokenizer:
  """Wraps a `tokenizers.Tokenizer` with fixed-length, padded, EOT-terminated encoding."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, max_len: int, eot_id: int,
               sot_id: int | None = None):
    if eot_id == 0:
      raise config_lib.ConfigError(
          "the tokenizer's end-of-text id is 0, which is reserved for padding")
    if max_len < 2 + (sot_id is not None):
      raise config_lib.ConfigError(f"max_len={max_len} leaves no room for text")
    self.tokenizer = tokenizer
    self.max_len = max_len
    self.eot_id = eot_id
    self.sot_id = sot_id
    self.vocab_size = tokenizer.get_vocab_size()

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """int32 [len(texts), max_len]."""
    out = np.zeros((len(texts), self.max_len), np.int32)
    head = [] if self.sot_id is None else [self.sot_id]
    room = self.max_len - len(head) - 1
    for row, encoding in zip(out, self.tokenizer.encode_batch(list(texts),
                                                              add_special_tokens=False)):
      ids = head + encoding.ids[:room] + [self.eot_id]
      row[:len(ids)] = ids
    return out

  def decode(self, ids: Sequence[int]) -> str:
    special = {0, self.eot_id, self.sot_id}
    return self.tokenizer.decode([int(i) for i in ids if int(i) not in special])

  def save(self, directory: str) -> None:
    """tokenizer.json + tokenizer_layout.json in `directory` (what `load` reads back)."""
    os.makedirs(directory, exist_ok=True)
    self.tokenizer.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_layout.json"), "w") as f:
      json.dump({"max_len": self.max_len, "eot_id": self.eot_id, "sot_id": self.sot_id}, f)


def load(directory: str) -> Tokenizer:
  """The tokenizer a run saved with `Tokenizer.save`."""
  with open(os.path.join(directory, "tokenizer_layout.json")) as f:
    layout = json.load(f)
  return Tokenizer(tokenizers.Tokenizer.from_file(os.path.join(directory, "tokenizer.json")),
                   **layout)


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
  """A Hugging Face tokenizer directory (tokenizer.json or anything AutoTokenizer reads)."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer directory {path} does not exist")
  json_path = os.path.join(path, "tokenizer.json")
  if os.path.exists(json_path):
    tok = tokenizers.Tokenizer.from_file(json_path)
    config = _special_tokens_from_config(path)
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
  return Tokenizer(tok, max_len, eot_id=eot_id, sot_id=sot_id)


def _special_tokens_from_config(path: str) -> dict:
  out = {}
  for name in ("special_tokens_map.json", "tokenizer_config.json"):
    for p in glob.glob(os.path.join(path, name)):
      with open(p) as f:
        for k, v in json.load(f).items():
          if k.endswith("_token") and v is not None:
            out.setdefault(k, v["content"] if isinstance(v, dict) else v)
  return out


def trained_on_captions(sources, path: str, vocab_size: int, max_len: int,
                        max_examples: int = 200_000) -> Tokenizer:
  """A BPE trained on the texts of [(source, text_key)], saved at (and reloaded from) `path`.

  Up to `max_examples` examples in all are read, spread evenly over each source.
  """
  if not os.path.exists(path):
    per_source = max(1, max_examples // len(sources))
    logging.info("Training a %d-token BPE on up to %d examples' texts -> %s", vocab_size,
                 per_source * len(sources), path)
    texts = (text for source, key in sources for text in _texts(source, per_source, key))
    tok = train_bpe(texts, vocab_size)
    tmp = f"{path}.tmp{os.getpid()}"
    tok.save(tmp)
    os.replace(tmp, path)  # Atomic: concurrent processes never read half a file.
  return from_trained(tokenizers.Tokenizer.from_file(path), max_len)


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
