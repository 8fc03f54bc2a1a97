"""LiT from cached image features (trainers/image_cache.py): the same objective as from images,
a cache keyed on what its numbers depend on, reused, resumed, and undecodable images skipped."""

import functools
import glob
import io
import json
import logging
import os
import signal
import time

import jax
import numpy as np
from PIL import Image
import pytest

from agriclip_jax import config_lib
from agriclip_jax import optim
from agriclip_jax import sharding
from agriclip_jax.input import datasets
from agriclip_jax.input import pipeline
from agriclip_jax.input import preprocess
from agriclip_jax.models import two_towers
from agriclip_jax.trainers import contrastive
from agriclip_jax.trainers import image_cache
from conftest import launch

SIZE = 32


@pytest.fixture(scope="module")
def lit():
  """(config, model, params, normalize) of the tiny LiT config."""
  config = config_lib.load("tests/tiny_config.py:kind=lit")
  model = two_towers.make(config.model, vocab_size=300)
  images = np.zeros((1, SIZE, SIZE, 3), np.float32)
  params = model.init(jax.random.key(0), images, np.zeros((1, 16), np.int32))["params"]
  normalize = functools.partial(preprocess.normalize, mean=config.input.mean,
                                std=config.input.std)
  return config, model, params, normalize


def _png(seed: int) -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 255, (40, 30, 3), dtype=np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format="PNG")
  return out.getvalue()


def test_training_from_cached_features_equals_training_from_images(lit):
  config, model, params, normalize = lit
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (8, SIZE, SIZE, 3), dtype=np.uint8)
  tokens = rng.integers(1, 300, (8, 16), dtype=np.int32)
  features = image_cache.encoder(model, normalize)(params, images)
  assert features.shape == (8, two_towers.feature_width(model.image))
  loss = contrastive.make_loss("softmax")
  from_images = contrastive.objective_of(model, normalize, loss)
  from_cache = contrastive.objective_of(model, normalize, loss,
                                        functools.partial(contrastive.embed_cached, model))
  key = jax.random.key(1)
  (want, want_metrics), want_grads = jax.value_and_grad(from_images, has_aux=True)(
      params, {"image": images, "text": tokens}, key)
  (got, got_metrics), got_grads = jax.value_and_grad(from_cache, has_aux=True)(
      params, {image_cache.FEATURES: features, "text": tokens}, key)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for name in want_metrics:
    np.testing.assert_allclose(got_metrics[name], want_metrics[name], rtol=1e-5, atol=1e-6)
  want_grads, got_grads = optim.flatten(want_grads), optim.flatten(got_grads)
  trained = [k for k in want_grads if not k.startswith("img/") or k.startswith("img/head/")]
  assert "img/head/kernel" in trained and any(k.startswith("txt/") for k in trained)
  for name in trained:  # What LiT trains gets the same gradient.
    np.testing.assert_allclose(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-6,
                               err_msg=name)
  # The training transform draws a cached view instead of decoding an image.
  transform = pipeline.TrainTransform(image_size=SIZE, tokenize=None,
                                      features_key=image_cache.FEATURES)
  example = {image_cache.FEATURES: np.arange(6.0).reshape(3, 2),
             image_cache.VALID: np.ones(3, bool)}
  drawn = {tuple(transform(example, np.random.default_rng(s))[image_cache.FEATURES])
           for s in range(30)}
  assert drawn == {(0.0, 1.0), (2.0, 3.0), (4.0, 5.0)}


def _description(views=0, digest="d", source=tuple(range(20)), tower=None,
                 **input_overrides):
  config = config_lib.load("tests/tiny_config.py:kind=lit")
  config.image_cache.update(views=views, shard_size=10)  # 16 at global batches of 8.
  config.input.update(input_overrides)

  class Builder:
    class info:  # pylint: disable=invalid-name
      full_name = "fake/1.0.0"

  component = dict(split="train", classes="", image_key="image")
  return image_cache.describe(config, component, Builder, source,
                              tower or {"width": 32, "dtype": np.float32}, digest, 8)


def test_the_cache_key_follows_what_the_features_depend_on(lit):
  config, model, params, _ = lit
  base = image_cache.key_of(_description())
  assert image_cache.key_of(_description()) == base
  for change in (dict(views=2), dict(digest="e"), dict(image_size=64),
                 dict(mean=(0.0, 0.0, 0.0))):
    assert image_cache.key_of(_description(**change)) != base, change
  # Augmented views also depend on the crop, flip and seed; the centre crop does not.
  assert (image_cache.key_of(_description(views=2, flip=False))
          != image_cache.key_of(_description(views=2)))
  assert image_cache.key_of(_description(flip=False)) == base
  # A class selection is keyed by the examples it selects, not by how it was written.
  subset = lambda ids: datasets.Subset(list(range(40)), ids)
  assert (image_cache.key_of(_description(source=subset(range(20))))
          == image_cache.key_of(_description(source=subset(list(range(20))))))
  assert (image_cache.key_of(_description(source=subset(range(20))))
          != image_cache.key_of(_description(source=subset(range(1, 21)))))
  # Options that leave the trunk's features alone do not rebuild it; its dtype does.
  tower = {"width": 32, "dtype": np.float32}
  assert image_cache.key_of(_description(tower=dict(tower, remat="full"))) == base
  assert image_cache.key_of(_description(tower=dict(tower, scan=True))) == base
  assert image_cache.key_of(_description(tower=dict(tower, dtype=np.float16))) != base
  assert _description()["shard_size"] == 16
  # The digest covers the trunk's weights, not the head that LiT trains.
  digest = image_cache.trunk_digest(params)
  flat = optim.flatten(params)
  head = optim.unflatten({**flat, "img/head/kernel": flat["img/head/kernel"] + 1})
  assert image_cache.trunk_digest(head) == digest
  trunk = [k for k in flat if k.startswith("img/") and not k.startswith("img/head/")]
  changed = optim.unflatten({**flat, trunk[0]: flat[trunk[0]] + 1e-3})
  assert image_cache.trunk_digest(changed) != digest
  del config, model


def test_build_is_exact_resumable_reused_and_marks_undecodable_images(lit, tmp_path, caplog):
  config, model, params, normalize = lit
  source = [{"image": _png(i), "label": i, "id": f"ex{i}"} for i in range(20)]
  source[7] = {"image": b"not an image", "label": 7, "id": "ex7"}
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 1)])
  encode = image_cache.encoder(model, normalize)
  args = dict(image_key="image", image_size=SIZE, seed=3, crop_scale=(0.5, 1.0), flip=True)
  description = _description(views=2)
  directory = str(tmp_path / "cache")
  cache = image_cache.build(directory, source, description, encode, params, mesh, 8, args, 2)
  assert cache.meta["undecodable"] == 1 and cache.meta["width"] == 32
  # 20 examples in shards of 16 (two global batches of 8) and 4.
  assert len(glob.glob(os.path.join(directory, "features-*.npy"))) == 2
  for index in (0, 9, 15, 16, 19):  # Each view is the one its (seed, index, view) draws.
    for view in range(2):
      image = preprocess.train_image(source[index]["image"], SIZE,
                                     np.random.default_rng([3, index, view]))
      np.testing.assert_allclose(cache.features(index)[view], encode(params, image[None])[0],
                                 rtol=1e-5, atol=1e-6)
  assert not np.allclose(cache.features(0)[0], cache.features(0)[1])
  assert cache.valid(7).tolist() == [False, False] and cache.valid(6).all()
  # Training replaces the undecodable example (the pipeline's CorruptImageError path).
  cached = image_cache.CachedSource(source)
  cached.attach(cache)
  with pytest.raises(preprocess.CorruptImageError, match="ex7: its image did not decode"):
    pipeline.cached_view(cached[7], image_cache.FEATURES, np.random.default_rng(0))

  # Interrupted with shard 0 cut short (a crash before the data reached the disk): only that
  # shard is embedded again, to the same bytes.
  files = sorted(glob.glob(os.path.join(directory, "*.npy")))
  before = {path: open(path, "rb").read() for path in files}
  os.remove(os.path.join(directory, image_cache.META))
  features_0 = image_cache.shard_paths(directory, 0)[0]
  with open(features_0, "r+b") as f:
    f.truncate(len(before[features_0]) // 2)
  with caplog.at_level(logging.INFO):
    image_cache.build(directory, source, description, encode, params, mesh, 8, args, 2)
  assert "resuming" in caplog.text and "1 of 2 shards were written" in caplog.text
  written = [r.getMessage() for r in caplog.records if "written (" in r.getMessage()]
  assert len(written) == 1 and "shard 1 of 2 written" in written[0]
  assert {path: open(path, "rb").read() for path in files} == before
  # Finished: reused as it is.
  caplog.clear()
  with caplog.at_level(logging.INFO):
    again = image_cache.build(directory, source, description, encode, params, mesh, 8, args, 2)
  assert "reusing" in caplog.text and "written (" not in caplog.text
  timeless = lambda meta: {k: v for k, v in meta.items() if k != "build_seconds"}
  assert timeless(again.meta) == timeless(cache.meta)
  # The centre crop alone: one view, the evaluation image's features.
  centre = image_cache.build(str(tmp_path / "centre"), source, _description(), encode,
                             params, mesh, 8, args, 2)
  np.testing.assert_allclose(
      centre.features(4)[0],
      encode(params, preprocess.eval_image(source[4]["image"], SIZE)[None])[0], rtol=1e-5,
      atol=1e-6)


def test_the_cache_needs_a_locked_trunk_and_no_dropout(lit):
  config, model, params, _ = lit
  labels = {k: optim.FROZEN if k.startswith("img/") and not k.startswith("img/head/")
            else "default" for k in optim.flatten(params)}
  image_cache.check_locked(labels)  # LiT: fine.
  image_cache.check(config.image_cache, model.image)
  trainable = dict(labels, **{k: "default" for k in labels if k.startswith("img/")})
  with pytest.raises(config_lib.ConfigError, match="needs a locked image tower"):
    image_cache.check_locked(trainable)
  with pytest.raises(config_lib.ConfigError, match="dropout 0.1"):
    image_cache.check(config.image_cache, dict(model.image, dropout=0.1))
  config.image_cache.views = -1
  with pytest.raises(config_lib.ConfigError, match="views must not be negative"):
    image_cache.check(config.image_cache, model.image)


def _cache_files(directory):
  return {os.path.relpath(p, directory): open(p, "rb").read()
          for p in glob.glob(os.path.join(directory, "*", "*.npy"))}


def test_lit_from_the_cache_survives_sigkill_and_matches_an_uninterrupted_build(data_dir,
                                                                                tmp_path):
  """A LiT run killed while it builds its cache resumes the build and ends like a run whose
  build was never interrupted; evaluation runs the real image tower."""
  args = ("--config.image_cache.enabled=True", "--config.image_cache.views=2",
          "--config.image_cache.shard_size=32")  # One global batch (eval_batch_size).
  first, cache_a = str(tmp_path / "first"), str(tmp_path / "cache_a")
  process = launch(first, "tests/tiny_config.py:kind=lit", *args,
                   f"--config.image_cache.dir={cache_a}", data_dir=data_dir, background=True)
  start = time.time()
  while len(glob.glob(os.path.join(cache_a, "*", "features-*.npy"))) < 2:
    assert process.poll() is None, process.stdout.read()[-3000:]
    assert time.time() - start < 300, "no cache shards in time"
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not glob.glob(os.path.join(cache_a, "*", image_cache.META))  # Really cut short.
  result = launch(first, "tests/tiny_config.py:kind=lit", *args,
                  f"--config.image_cache.dir={cache_a}", data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Image cache: resuming" in result.stderr
  # Another run locking the same tower builds its own cache without interruption.
  second, cache_b = str(tmp_path / "second"), str(tmp_path / "cache_b")
  result = launch(second, "tests/tiny_config.py:kind=lit", *args,
                  f"--config.image_cache.dir={cache_b}", "--config.requires=[]",
                  f"--config.init.workdir={first}/image_tower", data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Image cache: resuming" not in result.stderr
  files = _cache_files(cache_a)
  assert len(files) == 2 * 23 and files == _cache_files(cache_b)  # 720 examples in 32s.

  def summary(workdir):
    with open(os.path.join(workdir, "summary.json")) as f:
      return {k: v for k, v in json.load(f).items() if not k.endswith("/seconds")}

  assert summary(first) == summary(second)
  assert summary(first)["heldout/num_examples"] > 0  # Evaluated with the image tower.
