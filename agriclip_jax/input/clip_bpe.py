"""CLIP's byte-level BPE (OpenAI's vocabulary, as open_clip's SimpleTokenizer applies it), as a
serialisable `tokenizers` pipeline wrapped in our `Tokenizer` layout.

open_clip checkpoints (BioCLIP among them) ship no tokenizer file: the vocabulary comes with an
installed open_clip (`bpe_simple_vocab_16e6.txt.gz`), found without importing open_clip or
torch. Ids equal `open_clip.tokenize`'s (tests/test_import_open_clip.py).
"""

import gzip
import importlib.util
import os
import unicodedata

import tokenizers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers

from agriclip_jax import config_lib
from agriclip_jax.input import tokenizer as tokenizer_lib

CLIP_VOCAB_SIZE = 49408
SOT, EOT = "<start_of_text>", "<end_of_text>"
# HTML entities decoded as ftfy + html.unescape do (three passes: nested escapes; &amp; last).
ENTITIES = {"&lt;": "<", "&gt;": ">", "&quot;": '"', "&#39;": "'", "&#x27;": "'", "&apos;": "'",
            "&nbsp;": "\xa0", "&lsquo;": "\u2018", "&rsquo;": "\u2019", "&ldquo;": "\u201c",
            "&rdquo;": "\u201d", "&ndash;": "\u2013", "&mdash;": "\u2014", "&hellip;": "\u2026",
            "&deg;": "\xb0", "&times;": "\xd7", "&amp;": "&"}
# ftfy's Latin ligatures and digraphs (their NFKC forms, except that it keeps the long s).
LIGATURES = {c: unicodedata.normalize("NFKC", c) for c in "\u0132\u0133\u0149\u01c4\u01c5\u01c6"
             "\u01c7\u01c8\u01c9\u01ca\u01cb\u01cc\u01f1\u01f2\u01f3\ufb00\ufb01\ufb02\ufb03\ufb04"
             "\ufb06"} | {"\ufb05": "\u017ft"}
# ftfy's width fixes: the ideographic space and the full/half-width forms.
WIDTHS = {"\u3000": " "} | {chr(i): unicodedata.normalize("NFKC", chr(i))
                            for i in range(0xFF01, 0xFFF0)
                            if unicodedata.normalize("NFKC", chr(i)) != chr(i)}
# What Python's str.split() splits on (open_clip's whitespace_clean).
WHITESPACE = (r"[\t\n\x{b}\x{c}\r\x{1c}-\x{1f} \x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}"
              r"\x{2029}\x{202f}\x{205f}\x{3000}]+")


# Python's str.lower() makes a capital sigma that ends a word final (Unicode's rule, except that
# at most one case-ignorable character is skipped before it).
FINAL_SIGMA = (r"(?<=\p{Cased}|\p{Cased}\p{Case_Ignorable})\x{3a3}"
               r"(?!\p{Case_Ignorable}*\p{Cased})")


def vocabulary_file() -> str | None:
  """open_clip's packaged CLIP BPE merges, found without importing open_clip (and torch)."""
  spec = importlib.util.find_spec("open_clip")
  for folder in (spec.submodule_search_locations or []) if spec else []:
    path = os.path.join(folder, "bpe_simple_vocab_16e6.txt.gz")
    if os.path.isfile(path):
      return path
  return None


def byte_alphabet() -> list[str]:
  """CLIP's (and GPT-2's) byte -> printable character table, in its vocabulary order."""
  printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
  others = [b for b in range(256) if b not in printable]
  return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def _normalizer():
  """open_clip's cleaning (ftfy.fix_text, html.unescape twice, whitespace, lower case) as a
  serialisable `tokenizers` normalizer. Reproduced: common HTML entities, ANSI escapes,
  control characters, Latin ligatures, full/half-width forms, curly quotes, NFC, Python's
  whitespace and final-sigma lower-casing. Not reproduced: ftfy's mojibake repair (e.g.
  "cafÃ©"), C1 control characters and rare HTML entities; such text may tokenize differently."""
  steps = [normalizers.Replace(k, v) for _ in range(3) for k, v in ENTITIES.items()]
  steps += [normalizers.Replace(Regex(r"\x{1b}\[[0-9;]*[a-zA-Z]"), ""),
            normalizers.Replace(Regex(r"[\x{0}-\x{8}\x{b}\x{e}-\x{1f}\x{7f}\x{206a}-\x{206f}"
                                      r"\x{feff}\x{fff9}-\x{fffc}]"), "")]
  steps += [normalizers.Replace(k, v) for k, v in (LIGATURES | WIDTHS).items()]
  steps += [normalizers.Replace(Regex(r"[\x{2bc}\x{2018}-\x{201b}]"), "'"),
            normalizers.Replace(Regex(r"[\x{201c}-\x{201f}]"), '"'), normalizers.NFC(),
            normalizers.Replace(Regex(WHITESPACE), " "), normalizers.Strip(),
            normalizers.Replace(Regex(FINAL_SIGMA), "\u03c2"),
            normalizers.Lowercase(),
            # open_clip's case-insensitive word pattern matches no alternative at U+0345: it
            # drops it, splitting the text there.
            normalizers.Replace("\u0345", " ")]
  return normalizers.Sequence(steps)


def bpe(bpe_path: str):
  """A `tokenizers.Tokenizer` equal to open_clip's SimpleTokenizer: CLIP's word pattern,
  byte-level symbols, `</w>` ending each word, 49,408 ids (<start_of_text> 49406,
  <end_of_text> 49407)."""
  with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
    lines = f.read().split("\n")
  num_merges = CLIP_VOCAB_SIZE - 2 * 256 - 2  # Bytes, bytes ending a word, two special tokens.
  merges = [tuple(line.split()) for line in lines[1:1 + num_merges]]
  alphabet = byte_alphabet()
  vocab = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [SOT, EOT]
  tok = tokenizers.Tokenizer(models.BPE({t: i for i, t in enumerate(vocab)}, merges,
                                        end_of_word_suffix="</w>"))
  tok.normalizer = _normalizer()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.WhitespaceSplit(),
      pre_tokenizers.Split(Regex(r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+"),
                           "isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.Sequence([decoders.Replace("</w>", "\u0120"), decoders.ByteLevel()])
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=True)
                          for t in (SOT, EOT)])
  return tok


def tokenizer(max_len: int, bpe_path: str | None = None):
  """Our Tokenizer over the CLIP BPE: `sot text... eot 0 0 ...`, as `open_clip.tokenize`."""
  path = bpe_path or vocabulary_file()
  if path is None:
    raise config_lib.ConfigError("the CLIP BPE vocabulary comes with open_clip "
                                 "(pip install open_clip_torch); or name a tokenizer path")
  tok = bpe(path)
  return tokenizer_lib.Tokenizer(tok, max_len, eot_id=tok.token_to_id(EOT),
                                 sot_id=tok.token_to_id(SOT))
