"""LiT from cached image features: a locked image trunk runs once per image, not every step.

With `config.image_cache.enabled`, the contrastive trainer runs the frozen image trunk over the
training split once, before its first step, and stores the features the trainable image head
reads (`pre_logits`); training then reads those features instead of decoding and embedding
images, and samples one of `views` stored views of each image per step (`views=0`: one view,
the centre crop that evaluation uses). Evaluation still runs the real image tower.

- **Keyed**: a cache lives under a key of everything its numbers depend on: the dataset, split
  and class selection, the tower's architecture and dtype, a digest of the trunk's weights,
  the preprocessing (size, mean, std, crop and flip for augmented views, the seed that draws
  them) and the number of views. Later runs with the same key reuse it; a change of any of them
  builds a new one beside it. `meta.json` in each cache says what it holds.
- **Sharded**: every device of every process embeds a share of each batch (the image tower's
  usual sharding); process 0 writes the gathered shard files, so the directory must be shared
  by all processes (as checkpoints are).
- **Resumable**: the cache is written in shards of `shard_size` examples, each written
  atomically; an interrupted build resumes at the first missing shard. The features of a view
  depend only on the example, the view and the seed, so a resumed build writes the same bytes.
- **Undecodable images** are counted, named in warnings and marked invalid in the cache;
  training replaces such an example with the next one of its stream, as it does when decoding.
"""

import collections
import dataclasses
import hashlib
import json
import math
import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from agriclip_jax import config_lib
from agriclip_jax import files
from agriclip_jax import optim
from agriclip_jax import sharding
from agriclip_jax.input import pipeline
from agriclip_jax.input import preprocess

META = "meta.json"
FORMAT = 1
# Shards whose files a process keeps open for reading at once.
MAX_OPEN_SHARDS = 64
# Keys of the training example that carry its cached views and whether each decoded.
FEATURES, VALID = "image_features", "image_features_valid"


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      enabled=False,  # LiT only: train from the locked image trunk's cached features.
      views=0,  # Augmented views per image (random crop + flip); 0 = the centre crop only.
      shard_size=4096,  # Examples per cache file (the unit an interrupted build resumes by).
      dir="",  # "" = beside the (first) training dataset, under image_cache/<key>.
  ))


def check_locked(labels: dict[str, str]) -> None:
  """One line unless every image parameter except the head is frozen."""
  moving = [k for k, label in labels.items() if k.startswith("img/")
            and not k.startswith("img/head/") and label != optim.FROZEN]
  if moving:
    raise config_lib.ConfigError(
        f"config.image_cache.enabled needs a locked image tower, but {len(moving)} of its "
        f"parameters train (e.g. {moving[0]}); freeze them in config.optim.rules (LiT: "
        "[('img/head/.*', {}), ('img/.*', None), ('.*', {})])")


def check(config, img_kwargs: dict[str, Any]) -> None:
  """One line unless `config.image_cache` is valid and the tower (its resolved keyword
  arguments) has no dropout, which cached features cannot reproduce."""
  if img_kwargs.get("dropout"):
    raise config_lib.ConfigError(
        f"config.image_cache.enabled: the image tower has dropout {img_kwargs['dropout']}, "
        "which cached features cannot reproduce; set model.img.dropout=0")
  if config.views < 0:
    raise config_lib.ConfigError(f"config.image_cache.views must not be negative; got "
                                 f"{config.views}")
  if config.shard_size < 1:
    raise config_lib.ConfigError(f"config.image_cache.shard_size must be at least 1; got "
                                 f"{config.shard_size}")


def trunk_digest(params) -> str:
  """SHA-1 of the image trunk's weights (every `img/` parameter but the head): names, shapes,
  dtypes and bytes, gathered from every process."""
  digest = hashlib.sha1()
  for path, value in sorted(optim.flatten(params).items()):
    if not path.startswith("img/") or path.startswith("img/head/"):
      continue
    if not getattr(value, "is_fully_addressable", True):
      value = multihost_utils.process_allgather(value, tiled=True)
    value = np.asarray(value)
    digest.update(f"{path}:{value.shape}:{value.dtype}".encode())
    digest.update(np.ascontiguousarray(value).tobytes())
  return digest.hexdigest()


# Tower options that do not change the trunk's features.
NOT_FEATURES = ("num_classes", "head_bias", "remat", "scan")


def describe(config, component: dict[str, Any], builder, source, img_kwargs: dict[str, Any],
             digest: str, batch_size: int) -> dict[str, Any]:
  """What a cache's numbers depend on (its key is a digest of this). Its shard size is
  `config.image_cache.shard_size` rounded up to whole global batches of `batch_size`, so
  only the last shard is padded when it is embedded."""
  views = config.image_cache.views
  indices = getattr(source, "indices", None)  # A class selection (datasets.Subset).
  tower = {k: (jnp.dtype(v).name if k == "dtype" else v)
           for k, v in sorted(img_kwargs.items()) if k not in NOT_FEATURES}
  description = dict(
      format=FORMAT, dataset=builder.info.full_name, split=component["split"],
      examples_sha1=None if indices is None else hashlib.sha1(
          np.asarray(indices, np.int64).tobytes()).hexdigest(),
      image_key=component["image_key"], num_examples=len(source),
      tower=json.loads(json.dumps(tower, default=str)), trunk_sha1=digest,
      image_size=config.input.image_size, mean=list(config.input.mean),
      std=list(config.input.std), views=views,
      shard_size=math.ceil(config.image_cache.shard_size / batch_size) * batch_size)
  if views:
    description.update(crop_scale=list(config.input.crop_scale), flip=config.input.flip,
                       seed=config.seed)
  return description


def key_of(description: dict[str, Any]) -> str:
  return hashlib.sha1(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


class Cache:
  """A finished cache: `features(i)` [views, width] float32 and `valid(i)` [views] of example
  i, read from memory-mapped shard files (opened on first use in each process)."""

  def __init__(self, directory: str):
    meta = files.read_json(files.path(directory) / META)
    self.directory, self.meta = directory, meta
    self.num_examples, self.shard_size = meta["num_examples"], meta["shard_size"]
    self._maps = collections.OrderedDict()

  def __getstate__(self):  # Worker processes open their own maps.
    return {**self.__dict__, "_maps": collections.OrderedDict()}

  def _shard(self, index: int):
    shard, row = divmod(index, self.shard_size)
    if shard in self._maps:
      self._maps.move_to_end(shard)
    else:  # Each map holds a file open: keep the most recently read ones only.
      if len(self._maps) >= MAX_OPEN_SHARDS:
        self._maps.popitem(last=False)
      self._maps[shard] = tuple(files.load_array(path) for path in
                                shard_paths(self.directory, shard))
    features, valid = self._maps[shard]
    return features[row], valid[row]

  def features(self, index: int) -> np.ndarray:
    return np.asarray(self._shard(index)[0])

  def valid(self, index: int) -> np.ndarray:
    return np.asarray(self._shard(index)[1])


def shard_paths(directory: str, shard: int) -> tuple[str, str]:
  return (files.join(directory, f"features-{shard:05d}.npy"),
          files.join(directory, f"valid-{shard:05d}.npy"))


def _complete(directory: str, shard: int, rows: int, views: int) -> bool:
  """Whether a shard's files exist and hold `rows` examples of `views` views."""
  try:
    features, valid = (files.load_array(p) for p in shard_paths(directory, shard))
    return features.shape[:2] == (rows, views) and valid.shape == (rows, views)
  except (OSError, ValueError):
    return False


def _agreed(value: np.ndarray) -> np.ndarray:
  """Process 0's `value` on every process (what it sees on disk decides for all)."""
  if jax.process_count() == 1:
    return value
  return np.asarray(multihost_utils.broadcast_one_to_all(value))


def _open(directory: str) -> Cache:
  if not (files.path(directory) / META).exists():
    raise config_lib.ConfigError(
        f"image cache {directory} is finished on process 0 but not visible on process "
        f"{jax.process_index()}: config.image_cache.dir must be a directory all processes "
        "share")
  return Cache(directory)


class CachedSource:
  """A training source whose examples also carry their cached views (FEATURES, VALID), once
  `attach` has given it its cache (the trainer builds it after the state exists)."""

  def __init__(self, source):
    self._source, self.cache = source, None

  def attach(self, cache: Cache) -> None:
    if cache.num_examples != len(self._source):
      raise ValueError(f"cache {cache.directory} holds {cache.num_examples} examples, the "
                       f"source {len(self._source)}")
    self.cache = cache

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int):
    if self.cache is None:
      raise RuntimeError("CachedSource read before its cache was attached")
    return {**self._source[index], FEATURES: self.cache.features(index),
            VALID: self.cache.valid(index)}


@dataclasses.dataclass(frozen=True)
class _ViewTransform:
  """(index, example) -> the image of one view: the centre crop (`view` None) or augmented
  view `view`, its randomness drawn from (seed, index, view); an undecodable image gives
  zeros and ok=False."""
  image_key: str
  image_size: int
  view: int | None
  seed: int
  crop_scale: tuple[float, float]
  flip: bool

  def __call__(self, record) -> dict[str, Any]:
    index, example = record
    if self.view is None:
      decode = lambda data: preprocess.eval_image(data, self.image_size)
    else:
      rng = np.random.default_rng([self.seed, index, self.view])
      decode = lambda data: preprocess.train_image(data, self.image_size, rng,
                                                   scale=self.crop_scale, flip=self.flip)
    try:
      image, ok = pipeline.image_of(example, self.image_key, decode), True
    except preprocess.CorruptImageError as e:
      logging.warning("image cache: %s; marked invalid (training skips it)", e)
      image, ok = np.zeros((self.image_size, self.image_size, 3), np.uint8), False
    return {"image": image, "ok": np.bool_(ok)}


class _Indexed:
  """(i, source[i]) for i in [start, stop)."""

  def __init__(self, source, start: int, stop: int):
    self._source, self._start, self._stop = source, start, stop

  def __len__(self) -> int:
    return self._stop - self._start

  def __getitem__(self, index: int):
    return self._start + index, self._source[self._start + index]


def build(directory: str, source, description: dict[str, Any], encode: Callable, params,
          mesh, batch_size: int, transform_args: dict[str, Any],
          num_threads: int = 8) -> Cache:
  """The cache in `directory`, built first (or finished, after an interruption) when needed.

  `encode(params, images)` -> [batch, width] features of a global batch (jitted by the
  caller, output replicated); `transform_args` are `_ViewTransform`'s fields but `view`.
  """
  if _agreed(np.bool_((files.path(directory) / META).exists())):
    logging.info("Image cache: reusing %s", directory)
    return _open(directory)
  num_examples, views = description["num_examples"], description["views"]
  shard_size = description["shard_size"]
  num_shards = math.ceil(num_examples / shard_size)
  files.path(directory).mkdir(parents=True, exist_ok=True)
  span = lambda i: (i * shard_size, min((i + 1) * shard_size, num_examples))
  # Process 0's listing, before anything is written, decides what every process embeds.
  done = _agreed(np.array([_complete(directory, i, span(i)[1] - span(i)[0], max(views, 1))
                           for i in range(num_shards)]))
  todo = [i for i in range(num_shards) if not done[i]]
  if done.any():
    logging.info("Image cache: resuming %s; %d of %d shards were written", directory,
                 num_shards - len(todo), num_shards)
  batch_sharding = sharding.batch_sharding(mesh)
  rows = pipeline.rows_of_process(batch_sharding, batch_size)
  gather = jax.jit(lambda p, batch: (encode(p, batch["image"]), batch["ok"]),
                   out_shardings=sharding.replicated(mesh))
  start, embedded = time.time(), 0
  for n, shard in enumerate(todo):
    lo, hi = span(shard)
    features, valid = [], []
    for view in (range(views) if views else [None]):
      transform = _ViewTransform(view=view, **transform_args)
      parts = [gather(params, sharding.global_batch({"image": b["image"], "ok": b["ok"]},
                                                    batch_sharding))
               for b in pipeline.eval_batches(_Indexed(source, lo, hi), transform, rows,
                                              num_threads)]
      features.append(np.concatenate([np.asarray(f) for f, _ in parts])[:hi - lo])
      valid.append(np.concatenate([np.asarray(v) for _, v in parts])[:hi - lo])
    features = np.stack(features, axis=1).astype(np.float32)
    valid = np.stack(valid, axis=1)
    if jax.process_index() == 0:
      features_path, valid_path = shard_paths(directory, shard)
      files.save_array(valid_path, valid)
      files.save_array(features_path, features)  # Last: its presence marks the shard done.
    embedded += (hi - lo) * max(views, 1)
    rate = embedded / (time.time() - start)
    remaining = sum(span(i)[1] - span(i)[0] for i in todo[n + 1:]) * max(views, 1)
    logging.info("Image cache: shard %d of %d written (%.1f images/s, about %.0fs left)",
                 shard + 1, num_shards, rate, remaining / rate)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("image_cache_shards_written")
  if jax.process_index() == 0:
    valid = [np.asarray(files.load_array(shard_paths(directory, i)[1]))
             for i in range(num_shards)]
    invalid = int(sum((~v.all(axis=1)).sum() for v in valid))
    meta = dict(description, undecodable=invalid, build_seconds=time.time() - start,
                width=int(files.load_array(shard_paths(directory, 0)[0]).shape[-1]))
    files.write_json(files.path(directory) / META, meta)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("image_cache_finished")
  cache = _open(directory)
  logging.info("Image cache: %s built (%d views of %d examples; %d with an undecodable image) "
               "in %.1fs", directory, max(views, 1), num_examples, cache.meta["undecodable"],
               time.time() - start)
  return cache


def encoder(model, normalize) -> Callable:
  """(params, images) -> the image trunk's features (what the head reads), float32."""

  def encode(params, images):
    _, _, extras = model.apply({"params": params}, normalize(images), None)
    return extras["img"]["pre_logits"].astype(jnp.float32)

  return encode
