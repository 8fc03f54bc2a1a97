"""Embeddings of a whole split, computed sharded over all devices and processes."""

import functools

import jax
import numpy as np

from agriclip_jax import sharding
from agriclip_jax.input import pipeline


def embed_split(context, params, source, transform, batch_size: int,
                encode=None, max_examples: int = 0) -> dict[str, np.ndarray]:
  """Every output of `transform` but "image", and `encode(params, images)` as "embedding",
  for each example of `source` (the first `max_examples` if set), in order, on every
  process. Padding added to fill the last global batch is dropped."""
  encode = encode or context.encode_images
  if max_examples and max_examples < len(source):
    source = _Prefix(source, max_examples)
  batch_sharding = sharding.batch_sharding(context.mesh)
  rows = pipeline.rows_of_process(batch_sharding, batch_size)
  fn = _jitted(context, encode)
  gather = _jitted(context, _identity)
  columns = {}
  for local in pipeline.eval_batches(source, transform, rows, context.num_threads):
    batch = sharding.global_batch(local, batch_sharding)
    out = {"embedding": fn(params, batch["image"])}
    out.update({k: gather(params, v) for k, v in batch.items() if k != "image"})
    mask = np.asarray(out["mask"])
    for key, value in out.items():
      columns.setdefault(key, []).append(np.asarray(value)[mask])
  columns.pop("mask")
  return {k: np.concatenate(v) for k, v in columns.items()}


class _Prefix:
  def __init__(self, source, n):
    self._source, self._n = source, n

  def __len__(self):
    return self._n

  def __getitem__(self, index):
    return self._source[index]


def _identity(params, x):
  del params
  return x


@functools.lru_cache(maxsize=32)
def _jitted(context, fn):
  """`fn(params, batch array)` jitted for `context`'s mesh (cached per context and fn)."""
  return jax.jit(fn, in_shardings=(context.params_sharding,
                                   sharding.batch_sharding(context.mesh)),
                 out_shardings=sharding.replicated(context.mesh))
