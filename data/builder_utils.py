"""Helpers shared by the project's TFDS builders.

Checked image reading, a report of what a build skipped, deterministic hash splits, and
readers for the user's tables and JSON files that fail with the file and line of the first
problem. Builders import this module as `data.builder_utils` (inside the project) or as
`builder_utils` (under `tfds build data/<name>`, which puts `data/` on sys.path).
"""

import collections
import contextlib
import csv
import hashlib
import io
import json
import os
import re
import tempfile
from typing import Any, Iterator

from absl import logging
from PIL import Image
from PIL import ImageOps
from tensorflow_datasets.core import shuffle as tfds_shuffle

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
REPORT_NAME = "build_report.json"
EXIF_ORIENTATION = 0x0112


class InputError(ValueError):
  """A malformed input file; the message names the file and line."""


class BadImage(ValueError):
  """Image bytes that do not decode."""


@contextlib.contextmanager
def bounded_memory(buffer_bytes: int = 64 << 20):
  """While building: TFDS's writer keeps at most `buffer_bytes` of examples in memory.

  TFDS buffers up to 1 GB of serialized examples before spilling them to 1000 hashed buckets
  on disk (and later sorts one bucket at a time), so with this cap a build's memory stays flat
  whatever the number of images. Builders must keep TFDS's (hash) shuffling on: with
  shuffling disabled every example would land in one bucket, read whole at the end.
  """
  saved = tfds_shuffle.MAX_MEM_BUFFER_SIZE
  tfds_shuffle.MAX_MEM_BUFFER_SIZE = buffer_bytes
  try:
    yield
  finally:
    tfds_shuffle.MAX_MEM_BUFFER_SIZE = saved


class ReportedBuild:
  """Mixin for builders that read the user's files (list it before GeneratorBasedBuilder).

  During the build `self._report` counts and lists what was skipped and `self._scratch` is a
  temporary directory; TFDS's writer keeps bounded memory. Afterwards the report is written
  next to the prepared data and summarised in the log. A split that keeps no example stops
  the build in one line naming the report, which is then written beside where the data would
  have gone (TFDS deletes its temporary folder on failure).
  """

  def download_and_prepare(self, *args, **kwargs):
    # TFDS builds in a temporary `incomplete.XXXX` folder and renames it at the end: the log
    # and a failed build's report must name where the data goes, not that folder.
    self._final_data_dir = self.data_dir
    return super().download_and_prepare(*args, **kwargs)

  def _download_and_prepare(self, dl_manager, download_config=None):
    self._report = Report()
    final = os.fspath(self._final_data_dir).rstrip("/")
    failed_path = f"{final}.failed_{REPORT_NAME}"
    name = self.name + (f"/{self.builder_config.name}" if len(self.BUILDER_CONFIGS) > 1 else "")
    try:
      with tempfile.TemporaryDirectory() as scratch, bounded_memory():
        self._scratch = scratch
        super()._download_and_prepare(dl_manager, download_config)
    except AssertionError as e:  # TFDS's writer: 'split "val": No examples were yielded.'
      empty = re.search(r'split "([^"]+)": No examples were yielded', str(e))
      if not empty:
        raise
      os.makedirs(os.path.dirname(failed_path), exist_ok=True)
      self._report.write(failed_path)
      raise InputError(f"{name}: no {empty.group(1)} example kept ({self._report.summary()}); "
                       f"details in {failed_path}") from None
    self._report.write(os.path.join(self.data_dir, REPORT_NAME))
    if os.path.exists(failed_path):
      os.remove(failed_path)
    logging.info("%s: %s (details in %s)", name, self._report.summary(),
                 os.path.join(final, REPORT_NAME))


def checked_image(data: bytes) -> bytes:
  """`data` if it is a decodable, upright RGB (or greyscale) JPEG or PNG, else re-encoded so.

  The image features are declared 3-channel RGB and the pipeline reads pixels as stored, so
  the build stores what is declared, once: turned as the EXIF orientation says (phone photos),
  CMYK, palette and other modes converted to RGB, transparency composited on white (what a
  viewer shows), re-encoded as JPEG (quality 95) if it was one, else as lossless PNG.
  Decodes the whole image (kept JPEGs at 1/8 scale, which still reads every byte), so
  truncated and corrupt files are caught at build time rather than during training.
  """
  try:
    with Image.open(io.BytesIO(data)) as image:
      kind = image.format
      turned = image.getexif().get(EXIF_ORIENTATION, 1) in range(2, 9)
      if kind in ("JPEG", "PNG") and image.mode in ("RGB", "L") and not turned:
        if kind == "JPEG":
          image.draft("RGB", (max(1, image.size[0] // 8), max(1, image.size[1] // 8)))
        image.load()
        return data
      image = _upright_rgb(image)
      out = io.BytesIO()
      if kind == "JPEG":
        image.save(out, format="JPEG", quality=95)
      else:
        image.save(out, format="PNG")
      return out.getvalue()
  except Exception as e:  # PIL raises many types on bad data.
    raise BadImage(f"{type(e).__name__}: {e}") from None


def _upright_rgb(image: Image.Image) -> Image.Image:
  image = ImageOps.exif_transpose(image)
  if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
    image = image.convert("RGBA")
    image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
  return image.convert("RGB")


def read_image(path: str) -> bytes:
  with open(path, "rb") as f:
    return checked_image(f.read())


def is_hidden(name: str) -> bool:
  """Never data: hidden entries (`.ipynb_checkpoints`, `.DS_Store`, the `._x.jpg` resource
  forks macOS writes into zips) and the `__MACOSX` folder of a macOS zip."""
  return name.startswith(".") or name == "__MACOSX"


def is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_SUFFIXES) and not is_hidden(name)


def walk_images(root: str) -> Iterator[str]:
  """Image paths under `root` relative to it, in a deterministic order, one folder at a time."""
  stack = [""]
  while stack:
    relative = stack.pop()
    entries = sorted(os.scandir(os.path.join(root, relative)), key=lambda e: e.name,
                     reverse=True)
    for entry in entries:
      if is_hidden(entry.name):
        continue
      path = os.path.join(relative, entry.name)
      if entry.is_dir():
        stack.append(path)
    for entry in reversed(entries):
      if entry.is_file() and is_image(entry.name):
        yield os.path.join(relative, entry.name)


def split_of(key: str, holdout: str, fraction: float, default: str = "train") -> str:
  """`holdout` for a stable pseudo-random `fraction` of keys, else `default`."""
  digest = hashlib.sha1(key.encode("utf-8")).digest()
  return holdout if int.from_bytes(digest[:8], "big") / 2**64 < fraction else default


class Report:
  """Counts and lists what a build skipped and why; written next to the prepared dataset."""

  def __init__(self):
    self.skipped = collections.defaultdict(list)  # reason -> [(split, item, detail)]
    self.examples = collections.Counter()

  def skip(self, split: str, reason: str, item: str, detail: str = "") -> None:
    self.skipped[reason].append({"split": split, "item": item, "detail": detail})

  def count(self, split: str) -> None:
    self.examples[split] += 1

  def summary(self) -> str:
    kept = ", ".join(f"{n} {s}" for s, n in sorted(self.examples.items()))
    skipped = ", ".join(f"{len(v)} {k}" for k, v in sorted(self.skipped.items()))
    return f"kept {kept or 'nothing'}; skipped {skipped or 'nothing'}"

  def write(self, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
      json.dump({"examples": dict(self.examples),
                 "skipped": {k: {"count": len(v), "items": v}
                             for k, v in sorted(self.skipped.items())}},
                f, indent=1, ensure_ascii=False)


def load_json(path: str) -> Any:
  """json.load that names the file, line and column of a syntax error."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise InputError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from None
  except UnicodeDecodeError as e:
    raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_table(path: str, delimiter: str | None = None) -> Iterator[tuple[int, dict]]:
  """(line number, row dict) for each row of a CSV (or, by suffix, TSV) file with a header.

  A row with the wrong number of fields, or text that is not CSV, stops with file:line. A
  UTF-8 byte-order mark (Excel's "CSV UTF-8") is dropped. Rows that span several lines (a
  quote opened a field that runs over line ends) are logged with their lines: in a quoted
  table such a quote swallows the rows after it into one field.
  """
  with open(path, encoding="utf-8-sig", newline="") as f:
    reader = _table_reader(f, path, delimiter)
    try:
      header = next(reader, None)
      if not header:
        raise InputError(f"{path}:1: empty table (a header row is needed)")
      header = [h.strip() for h in header]
      spanning, rows, header_end = [], 0, reader.line_num
      last_line = header_end
      for row in reader:
        if reader.line_num > last_line + 1 and row:
          spanning.append(f"{last_line + 1}-{reader.line_num}")
        last_line = reader.line_num
        if not row:
          continue
        if len(row) != len(header):
          raise InputError(f"{path}:{reader.line_num}: {len(row)} fields, the header has "
                           f"{len(header)}")
        rows += 1
        yield reader.line_num, dict(zip(header, row))
    except csv.Error as e:
      raise InputError(f"{path}:{reader.line_num}: malformed table: {e}") from None
    except UnicodeDecodeError as e:
      raise InputError(f"{path}:{reader.line_num + 1}: not UTF-8 text ({e.reason})") from None
  if spanning:
    logging.warning("%s: %d lines after the header hold %d rows: rows span lines %s (a quote "
                    "opened a field that runs over line ends)", path, last_line - header_end,
                    rows, ", ".join(spanning[:10]))


def table_header(path: str, delimiter: str | None = None) -> list[str]:
  with open(path, encoding="utf-8-sig", newline="") as f:
    return [h.strip() for h in next(_table_reader(f, path, delimiter), [])]


def _table_reader(f, path: str, delimiter: str | None):
  """A csv reader for `f`: CSV with quotes; TSV as TSV, with quotes only if the file quotes
  every field of its header (else a caption that starts with a quote would swallow the rows
  after it, and quotes inside captions would be lost)."""
  delimiter = delimiter or ("\t" if path.lower().endswith(".tsv") else ",")
  if delimiter != "\t":
    return csv.reader(f, delimiter=delimiter)
  with open(path, "rb") as raw:  # Bytes: a decoding error is reported with its line later.
    header = raw.readline().decode("utf-8-sig", "replace").rstrip("\r\n").split("\t")
  if all(len(h) >= 2 and h.startswith('"') and h.endswith('"') for h in header):
    return csv.reader(f, delimiter="\t")
  return csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)


def stream_json_object(path: str, chunk_size: int = 1 << 20) -> Iterator[tuple[str, Any]]:
  """Streams a JSON file whose top level is an object: yields (key, item) for every item of
  an array value and (key, value) for any other value, holding one item in memory at a time.

  This is how iNaturalist's multi-gigabyte annotation files are read. A syntax error stops
  with the file, line and column, like `load_json`.

  Kept rather than a streaming parser library (ijson 3.6, its C backend): on a 136 MB file in
  iNat-2021's layout (400k images and annotations, 10k categories) this reads every item in
  13 s in one pass, where ijson took 27 s for one `items()` pass per array and 37 s for one
  pass of its events; the standard library's C decoder parses each item here. ijson's errors
  also give no line and column.
  """
  decoder = json.JSONDecoder()
  with open(path, encoding="utf-8") as f:
    reader = _JsonReader(f, path, chunk_size)
    reader.expect("{")
    if reader.peek() == "}":
      return
    while True:
      key = reader.value(decoder)
      if not isinstance(key, str):
        reader.fail("expected a string key")
      reader.expect(":")
      if reader.peek() == "[":
        reader.expect("[")
        if reader.peek() == "]":
          reader.expect("]")
        else:
          while True:
            yield key, reader.value(decoder)
            if reader.expect(",]") == "]":
              break
      else:
        yield key, reader.value(decoder)
      if reader.expect(",}") == "}":
        break
    if reader.peek() != "":
      reader.fail("extra data after the top-level object")


class _JsonReader:
  """A buffered cursor over a text file that knows the line and column of any position."""

  def __init__(self, f, path: str, chunk_size: int):
    self.f, self.path, self.chunk_size = f, path, chunk_size
    self.buffer, self.pos, self.eof = "", 0, False
    self.base = 0  # Offset in the file of buffer[0]...
    self.line, self.line_start = 1, 0  # ...its line number, and where that line starts.

  def _fill(self) -> bool:
    if self.eof:
      return False
    try:
      chunk = self.f.read(self.chunk_size)
    except UnicodeDecodeError as e:
      raise InputError(f"{self.path}: not UTF-8 text ({e.reason})") from None
    if not chunk:
      self.eof = True
      return False
    dropped = self.buffer[:self.pos]
    if "\n" in dropped:
      self.line += dropped.count("\n")
      self.line_start = self.base + dropped.rfind("\n") + 1
    self.base += self.pos
    self.buffer = self.buffer[self.pos:] + chunk
    self.pos = 0
    return True

  def peek(self) -> str:
    while True:
      while self.pos < len(self.buffer) and self.buffer[self.pos] in " \t\r\n":
        self.pos += 1
      if self.pos < len(self.buffer) or not self._fill():
        return self.buffer[self.pos:self.pos + 1]

  def expect(self, options: str) -> str:
    char = self.peek()
    if not char or char not in options:
      self.fail(f"expected {' or '.join(repr(c) for c in options)}, found "
                f"{repr(char) if char else 'the end of the file'}")
    self.pos += 1
    return char

  def value(self, decoder: json.JSONDecoder):
    self.peek()
    while True:
      try:
        value, end = decoder.raw_decode(self.buffer, self.pos)
      except json.JSONDecodeError as e:
        # An item cut by the chunk boundary: read more and retry; else a real error.
        if self._fill():
          continue
        self.fail(e.msg, at=e.pos)
      if end == len(self.buffer) and self._fill():
        continue  # A number may continue in the next chunk.
      self.pos = end
      return value

  def fail(self, message: str, at: int | None = None):
    at = self.pos if at is None else at
    before = self.buffer[:at]
    line = self.line + before.count("\n")
    if "\n" in before:
      column = at - before.rfind("\n")
    else:
      column = self.base + at - self.line_start + 1
    raise InputError(f"{self.path}:{line}:{column}: malformed JSON: {message}")
