"""Grain pipelines: training batches (resumable) and padded, masked evaluation batches.

Both are defined over the *global* batch: global batch b holds positions [b*G, (b+1)*G) of one
global example stream, and each process reads only the rows of it that its devices hold
(`rows_of_process`). Augmentation randomness is drawn per global position, so the numbers a
run sees do not depend on how many processes or devices share the batch.
"""

import dataclasses
import math
import sys
from typing import Any, Callable

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
  """Element j of this process = position (j // n) * G + start + j % n of the global stream."""

  def __init__(self, parent: grain.MapDataset, rows: Rows):
    super().__init__(parent)
    self._rows = rows
    parent_len = len(parent)
    self._length = (sys.maxsize if parent_len >= sys.maxsize
                    else parent_len // rows.global_size * rows.size)

  def __len__(self) -> int:
    return self._length

  def _global_position(self, index: int) -> int:
    batch, row = divmod(index, self._rows.size)
    return batch * self._rows.global_size + self._rows.start + row

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._global_position(index)]


@dataclasses.dataclass(frozen=True)
class TrainTransform:
  """Decode + random resized crop + flip; one caption (drawn per step) tokenized; the label."""
  image_size: int
  tokenize: Callable[[list[str]], np.ndarray] | None = None  # None: no text.
  image_key: str = "image"
  text_key: str = "captions"
  label_key: str | None = None  # None: no label.
  crop_scale: tuple[float, float] = (0.5, 1.0)
  flip: bool = True

  def __call__(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    out = {"image": image_of(example, self.image_key, lambda data: preprocess.train_image(
        data, self.image_size, rng, scale=self.crop_scale, flip=self.flip))}
    if self.tokenize is not None:
      out["text"] = self.tokenize([pick_text(example[self.text_key], rng)])[0]
    if self.label_key is not None:
      out["label"] = np.int32(example[self.label_key])
    return out


def image_of(example: dict[str, Any], key: str, decode: Callable[[bytes], np.ndarray]):
  """`decode(example[key])`; a corrupt image's error names the example."""
  try:
    return decode(example[key])
  except preprocess.CorruptImageError as e:
    name = example.get("id", "(no id)")
    name = name.decode() if isinstance(name, bytes) else name
    raise preprocess.CorruptImageError(f"example {name}: {e}") from None


def pick_text(value, rng: np.random.Generator | None = None) -> str:
  """A caption from a text feature: a string, or one of a list (random, else the first)."""
  if isinstance(value, (list, tuple, np.ndarray)):
    if not len(value):
      raise ValueError("example has an empty caption list")
    value = value[rng.integers(len(value))] if rng is not None else value[0]
  return value.decode() if isinstance(value, bytes) else str(value)


def train_iterator(source, transform: TrainTransform, rows: Rows, seed: int,
                   num_threads: int = 8, worker_count: int = 0):
  """An endless, checkpointable iterator of this process's rows of each global batch."""
  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
  ds = ds.random_map(transform)  # Seeded by global position: independent of process count.
  ds = _RowsOfGlobalBatches(ds, rows)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                            prefetch_buffer_size=2 * rows.size))
  ds = ds.batch(rows.size, drop_remainder=True)
  if worker_count:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(ds)


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
