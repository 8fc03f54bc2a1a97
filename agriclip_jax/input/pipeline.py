"""Grain pipelines: training batches (resumable) and padded, masked evaluation batches.

Both are defined over the *global* batch: global batch b holds positions [b*G, (b+1)*G) of one
global example stream, and each process reads only the rows of it that its devices hold
(`rows_of_process`). Augmentation randomness is drawn per global position, so the numbers a
run sees do not depend on how many processes or devices share the batch. The training
iterator's checkpointed state is its global position, so a run resumes with exactly the next
examples even on another number of processes or with another batch size.
"""

import dataclasses
import math
import sys
import zlib
from typing import Any, Callable, Sequence

from absl import logging
import grain
import jax
import numpy as np

from agriclip_jax.input import preprocess


@dataclasses.dataclass(frozen=True)
class Rows:
  """Rows [start, stop) of every global batch of `global_size` that this process holds."""
  start: int
  stop: int
  global_size: int

  @property
  def size(self) -> int:
    return self.stop - self.start


def rows_of_process(sharding: jax.sharding.Sharding, global_size: int) -> Rows:
  """Which contiguous rows of a batch-sharded global array live on this process."""
  index_map = sharding.addressable_devices_indices_map((global_size,))
  spans = sorted({idx[0].indices(global_size)[:2] for idx in index_map.values()})
  start, stop = spans[0][0], spans[-1][1]
  if sum(b - a for a, b in spans) != stop - start:
    raise ValueError(f"this process's batch rows are not contiguous: {spans}; use a mesh "
                     "whose batch axes keep each process's devices together")
  return Rows(start, stop, global_size)


class _RowsOfGlobalBatches(grain.MapDataset):
  """Element j of this process = global position offset + (j // n) * G + start + j % n."""

  def __init__(self, parent: grain.MapDataset, rows: Rows, offset: int = 0):
    super().__init__(parent)
    self._rows, self._offset = rows, offset
    parent_len = len(parent)
    self._length = (sys.maxsize if parent_len >= sys.maxsize
                    else (parent_len - offset) // rows.global_size * rows.size)

  def __len__(self) -> int:
    return self._length

  def _global_position(self, index: int) -> int:
    batch, row = divmod(index, self._rows.size)
    return self._offset + batch * self._rows.global_size + self._rows.start + row

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._global_position(index)]


@dataclasses.dataclass(frozen=True)
class TrainTransform:
  """Decode + random resized crop + flip; one caption tokenized; the label.

  `text_key` names a text feature: a string, a list of captions, or a dict of text variants
  (nested keys as "texts/common"). From a list or dict one text is drawn per step
  (`text_choice="step"`) or fixed per example (`"example"`, keyed by the image bytes).
  """
  image_size: int
  tokenize: Callable[[list[str]], np.ndarray] | None = None  # None: no text.
  image_key: str = "image"
  text_key: str = "captions"
  text_choice: str = "step"
  label_key: str | None = None  # None: no label.
  label_offset: int = 0  # Added to the label (keeps several datasets' classes apart).
  crop_scale: tuple[float, float] = (0.5, 1.0)
  flip: bool = True
  # Set: the example carries precomputed views of its image under this key ([views, width]),
  # and whether each decoded under `features_key + "_valid"`; one is drawn per step and
  # returned as that key instead of an image (LiT from an image cache).
  features_key: str | None = None

  def __call__(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if self.features_key is not None:
      out = {self.features_key: cached_view(example, self.features_key, rng)}
    else:
      out = {"image": image_of(example, self.image_key, lambda data: preprocess.train_image(
          data, self.image_size, rng, scale=self.crop_scale, flip=self.flip))}
    if self.tokenize is not None:
      text_rng = rng
      if self.text_choice == "example":
        text_rng = np.random.default_rng(zlib.crc32(example[self.image_key]))
      out["text"] = self.tokenize([pick_text(feature(example, self.text_key), text_rng)])[0]
    if self.label_key is not None:
      out["label"] = np.int32(feature(example, self.label_key) + self.label_offset)
    return out


@dataclasses.dataclass(frozen=True)
class MultiCropTransform:
  """DINO's views of each image: `global_0`, `global_1`, `local_0`... (see
  preprocess.dino_crops); with `also`, that transform's outputs too (joint training)."""
  crops: tuple[preprocess.Crop, ...]
  image_key: str = "image"
  blur_reference: int = 224
  also: Callable[[dict[str, Any], np.random.Generator], dict[str, Any]] | None = None

  def __call__(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    views = image_of(example, self.image_key, lambda data: preprocess.multi_crop(
        data, self.crops, rng, self.blur_reference))
    out = {crop_name(i): view for i, view in enumerate(views)}
    if self.also is not None:
      out.update(self.also(example, rng))
    return out


def crop_name(index: int) -> str:
  return f"global_{index}" if index < 2 else f"local_{index - 2}"


@dataclasses.dataclass(frozen=True)
class EvalTransform:
  """Resize + centre crop, and the label if `label_key` is set (evaluation)."""
  image_size: int
  image_key: str = "image"
  label_key: str | None = None

  def __call__(self, example: dict[str, Any]) -> dict[str, Any]:
    out = {"image": image_of(example, self.image_key,
                             lambda data: preprocess.eval_image(data, self.image_size))}
    if self.label_key is not None:
      out["label"] = np.int32(feature(example, self.label_key))
    return out


def feature(example: dict[str, Any], key: str):
  """example["a"]["b"] for key "a/b"."""
  value = example
  for part in key.split("/"):
    value = value[part]
  return value


def image_of(example: dict[str, Any], key: str, decode: Callable[[bytes], np.ndarray]):
  """`decode(example[key])`; a corrupt image's error names the example."""
  try:
    return decode(example[key])
  except preprocess.CorruptImageError as e:
    raise preprocess.CorruptImageError(f"example {example_name(example)}: {e}") from None


def example_name(example: dict[str, Any]) -> str:
  """What names an example in messages: its id, image path or file name."""
  name = example.get("id", example.get("image_path", example.get("file_name", "(no id)")))
  return name.decode() if isinstance(name, bytes) else name


def cached_view(example: dict[str, Any], key: str, rng: np.random.Generator) -> np.ndarray:
  """One of an example's cached views, drawn with `rng`; CorruptImageError where its image
  did not decode when the cache was built."""
  views = example[key]
  view = int(rng.integers(len(views)))
  if not example[key + "_valid"][view]:
    raise preprocess.CorruptImageError(f"example {example_name(example)}: its image did not "
                                       "decode when the image cache was built")
  return views[view]


def pick_text(value, rng: np.random.Generator | None = None) -> str:
  """A text from a text feature: a string, or one of a list / dict of texts (random, else the
  first)."""
  if isinstance(value, dict):
    value = [value[k] for k in sorted(value)]
  if isinstance(value, (list, tuple, np.ndarray)):
    if not len(value):
      raise ValueError("example has an empty caption list")
    value = value[rng.integers(len(value))] if rng is not None else value[0]
  return value.decode() if isinstance(value, bytes) else str(value)


# A training example whose image failed to decode, as the tolerant transform returns it.
UNDECODABLE = "__undecodable__"
# Consecutive undecodable examples of one stream after which a batch cannot be filled.
MAX_UNDECODABLE_RUN = 64


@dataclasses.dataclass(frozen=True)
class _Tolerant:
  """`transform`, but an image that fails to decode gives a marker (and a warning naming the
  example) instead of an exception, for `_NextDecodable` to replace."""
  transform: Callable[[dict[str, Any], np.random.Generator], dict[str, Any]]

  def __call__(self, example, rng):
    try:
      return self.transform(example, rng)
    except preprocess.CorruptImageError as e:
      logging.warning("training %s; the next example of the stream takes its place", e)
      return {UNDECODABLE: str(e)}


class _NextDecodable(grain.MapDataset):
  """Element i of the parent, or, when its image failed to decode, the first decodable one
  after it (a deterministic choice: a resumed run reads the same examples). Each element
  carries `undecodable`: 1 where it stands in for a failed example, else 0."""

  def __init__(self, parent: grain.MapDataset):
    super().__init__(parent)

  def __len__(self) -> int:
    return len(self._parent)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    for k in range(MAX_UNDECODABLE_RUN):
      element = self._parent[index + k]
      if UNDECODABLE not in element:
        return {**element, "undecodable": np.int32(k > 0)}
    raise preprocess.CorruptImageError(
        f"{MAX_UNDECODABLE_RUN} training examples in a row could not be decoded (the last: "
        f"{element[UNDECODABLE]}); is the dataset readable?")


class GlobalPositionIterator(grain.DatasetIterator):
  """This process's rows of successive global batches; checkpointable.

  Its state is the global stream position (examples consumed by all processes together), the
  same on every process: any process's checkpoint resumes any layout of processes and batch
  sizes at exactly the next example. It also keeps `undecodable`, the count of examples so far
  that failed to decode (over all processes; the training loop adds to it).
  """

  def __init__(self, build: Callable[[int], Any], global_size: int):
    super().__init__()
    self._build, self._global_size = build, global_size
    self._position, self._iterator = 0, None
    self.undecodable = 0

  @property
  def position(self) -> int:
    return self._position

  def __next__(self):
    if self._iterator is None:
      self._iterator = self._build(self._position)
    batch = next(self._iterator)
    self._position += self._global_size
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"global_position": self._position, "undecodable": self.undecodable}

  def set_state(self, state: dict[str, Any]) -> None:
    self.close()
    self._position = int(state["global_position"])
    self.undecodable = int(state.get("undecodable", 0))  # Absent before it was counted.

  def close(self) -> None:
    if self._iterator is not None and hasattr(self._iterator, "close"):
      self._iterator.close()
    self._iterator = None


def train_iterator(components: Sequence[tuple[Any, Callable, float]], rows: Rows, seed: int,
                   num_threads: int = 8, worker_count: int = 0) -> GlobalPositionIterator:
  """An endless, checkpointable iterator over a weighted mixture of (source, transform, weight).

  Each component is shuffled (afresh every epoch) and augmented with randomness drawn per
  position; with several, they are interleaved deterministically in proportion to the weights.
  An example whose image fails to decode is replaced by the next decodable one of its stream;
  batches say how many of their rows were (`undecodable`), for the loop to count.
  """
  streams = []
  for i, (source, transform, _) in enumerate(components):
    ds = grain.MapDataset.source(source).seed(seed + 1000 * i).shuffle().repeat()
    ds = ds.random_map(_Tolerant(transform))  # Seeded by position: process-count free.
    streams.append(_NextDecodable(ds))
  if len(streams) == 1:
    mixed = streams[0]
  else:
    mixed = grain.MapDataset.mix(streams, [float(w) for _, _, w in components])

  def build(position: int):
    ds = _RowsOfGlobalBatches(mixed, rows, offset=position)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                              prefetch_buffer_size=2 * rows.size))
    ds = ds.batch(rows.size, drop_remainder=True)
    if worker_count:
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(ds)

  return GlobalPositionIterator(build, rows.global_size)


class _Padded:
  """A random-access source extended with copies of element 0 (marked invalid) to `length`."""

  def __init__(self, source, length: int):
    self._source, self._length = source, length

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int):
    valid = index < len(self._source)
    return self._source[index if valid else 0], valid


def eval_batches(source, transform: Callable[[dict[str, Any]], dict[str, Any]], rows: Rows,
                 num_threads: int = 8):
  """Every example exactly once, in order, padded to whole global batches.

  Yields this process's rows of each global batch; each batch has a `mask` that is False on
  padding, so metrics that sum over `mask` count every example once.
  """
  num_batches = max(1, math.ceil(len(source) / rows.global_size))
  padded = _Padded(source, num_batches * rows.global_size)

  def apply(record):
    example, valid = record
    return {**transform(example), "mask": np.bool_(valid)}

  ds = grain.MapDataset.source(padded).map(apply)
  ds = _RowsOfGlobalBatches(ds, rows)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                            prefetch_buffer_size=2 * rows.size))
  return iter(ds.batch(rows.size, drop_remainder=True))
