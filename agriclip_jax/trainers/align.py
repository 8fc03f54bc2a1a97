"""Cross-model alignment, AgriCLIP's third stage: `config.trainer = "align"`.

Reads a DINO run and a CLIP run (their workdirs: config.json, checkpoints, tokenizer),
embeds the same images with the DINO image tower (backbone features) and the CLIP image tower
(normalised embeddings) — batched, sharded, cached in `<workdir>/features/` — and fits a linear
map with bias from the first to the second (closed-form ridge in float64, or the SGD recipe).
MSE and R^2 on a held-out split and the aligner (`aligner.npz`) are saved with the run.

Then AgriCLIP zero-shot on every zero-shot evaluator of `config.evals`, three ways: `clip/`
(CLIP image tower), `agriclip/` (image -> DINO -> aligner, against CLIP's text embeddings of
the class prompts) and `mix/` ((1 - w) * AgriCLIP + w * CLIP logits, w = `align.mix_weight`).
With `align.aligner_workdir` set it fits nothing and evaluates that run's aligner (the
pipeline's eval stage).
"""

import functools
import json
import os

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from agriclip_jax import config_lib
from agriclip_jax import metrics as metrics_lib
from agriclip_jax import sharding
from agriclip_jax.evaluators import base as evaluators
from agriclip_jax.evaluators import embeddings
from agriclip_jax.input import datasets
from agriclip_jax.input import pipeline
from agriclip_jax.input import preprocess
from agriclip_jax.input import tokenizer as tokenizer_lib
from agriclip_jax.models import aligner as aligner_lib
from agriclip_jax.models import dino as dino_model
from agriclip_jax.models import two_towers
from agriclip_jax.trainers import common
from agriclip_jax.trainers import loop as loop_lib
from agriclip_jax.trainers import state as state_lib

OPEN_FIELDS = ("evals",)
ALIGNER = "aligner.npz"


def default_config() -> ml_collections.ConfigDict:
  config = common.base_config()
  config.trainer = "align"
  config.total_steps = 1  # One fit; kept for the shared fields.
  config.align = dict(
      dino_workdir="{workdir}/../dino",
      clip_workdir="{workdir}/../clip",
      dino_state="teacher",  # The DINO checkpoint entry to use: teacher or params (student).
      aligner_workdir="",  # Evaluate this align run's aligner instead of fitting one.
      fit_split="train",
      heldout_split="test",
      max_examples=0,  # 0 = every example of the fit split
      method="closed_form",  # closed_form | sgd
      ridge=1e-6,
      standardize=True,
      sgd_epochs=70,
      sgd_batch_size=100,
      sgd_lr=1e-3,
      mix_weight=0.5,
  )
  return config


class Towers:
  """The DINO and CLIP towers of two finished runs, as one parameter tree + encoders."""

  def __init__(self, config, workdir: str, mesh):
    a = config.align
    dino_dir = config_lib.expand_path(a.dino_workdir, workdir)
    clip_dir = config_lib.expand_path(a.clip_workdir, workdir)
    dino_config, clip_config = state_lib.run_config(dino_dir), state_lib.run_config(clip_dir)
    if dino_config.trainer != "dino" or clip_config.trainer != "contrastive":
      raise config_lib.ConfigError(f"align.dino_workdir / clip_workdir must be a dino and a "
                                   f"contrastive run; got {dino_config.trainer!r} and "
                                   f"{clip_config.trainer!r}")
    self.tokenizer = tokenizer_lib.load(clip_dir)
    self.dino = dino_model.make(dino_config.model)
    self.clip = two_towers.make(clip_config.model, vocab_size=self.tokenizer.vocab_size)
    self.replicated = sharding.replicated(mesh)
    dino_params, _ = state_lib.load_entry(dino_dir, a.dino_state, self.replicated)
    clip_params, _ = state_lib.load_entry(clip_dir, "params", self.replicated)
    self.params = {"dino": dino_params, "clip": clip_params}
    self.sizes = {"dino": dino_config.dino.global_size, "clip": clip_config.input.image_size}
    self.image_size = max(self.sizes.values())
    self.normalize = {
        "dino": functools.partial(preprocess.normalize, mean=dino_config.input.mean,
                                  std=dino_config.input.std),
        "clip": functools.partial(preprocess.normalize, mean=clip_config.input.mean,
                                  std=clip_config.input.std)}

  def _images(self, tower: str, images):
    size = self.sizes[tower]
    if images.shape[1] != size:
      images = jax.image.resize(images.astype(jnp.float32),
                                (images.shape[0], size, size, 3), "bilinear")
    return self.normalize[tower](images)

  def dino_features(self, params, images):
    return self.dino.apply({"params": params["dino"]}, self._images("dino", images))[1]

  def clip_images(self, params, images):
    return self.clip.apply({"params": params["clip"]}, self._images("clip", images), None)[0]

  def aligned(self, params, images):
    x = self.dino_features(params, images).astype(jnp.float32)
    return two_towers.l2_normalize(x @ params["aligner"]["W"] + params["aligner"]["b"])

  def texts(self, params, tokens):
    return self.clip.apply({"params": params["clip"]}, None, tokens)[1]


def _features(towers, context, split_source, name, directory, batch_size, max_examples):
  """(DINO features, CLIP embeddings) of a split, from the cache or computed and cached."""
  paths = {k: os.path.join(directory, f"{name}_{k}.npy") for k in ("dino", "clip")}
  if all(os.path.exists(p) for p in paths.values()):
    return tuple(np.load(paths[k], mmap_mode="r") for k in ("dino", "clip"))
  size = towers.image_size
  transform = lambda ex: {"image": pipeline.image_of(
      ex, "image", lambda data: preprocess.eval_image(data, size))}
  out = {}
  for key, encode in (("dino", towers.dino_features), ("clip", towers.clip_images)):
    out[key] = embeddings.embed_split(context, towers.params, split_source, transform,
                                      batch_size, encode, max_examples)["embedding"]
  if jax.process_index() == 0:
    os.makedirs(directory, exist_ok=True)
    for key, path in paths.items():
      np.save(path + ".tmp.npy", out[key].astype(np.float32))
      os.replace(path + ".tmp.npy", path)
  return out["dino"], out["clip"]


def fit(config, towers, context, workdir, writer):
  """(W, b, MSE and R^2 on the fit and held-out splits); process 0 saves W and b.

  Every process holds every feature row and fits the same aligner, deterministically.
  """
  a = config.align
  builder = datasets.builder(config.input.dataset, config.input.data_dir or None)
  batch_size = context.batch_size
  cache = os.path.join(workdir, "features")
  x, y = _features(towers, context, datasets.data_source(builder, a.fit_split),
                   f"{a.fit_split}_{a.max_examples or 'all'}", cache, batch_size, a.max_examples)
  x_test, y_test = _features(towers, context, datasets.data_source(builder, a.heldout_split),
                             a.heldout_split, cache, batch_size, 0)
  logging.info("Fitting %s aligner: %s DINO features -> %s CLIP embeddings", a.method,
               x.shape, y.shape)
  if a.method == "closed_form":
    weights, bias = aligner_lib.fit_closed_form(aligner_lib.in_batches(x, y), a.ridge,
                                                a.standardize)
  elif a.method == "sgd":
    weights, bias = aligner_lib.fit_sgd(np.asarray(x), np.asarray(y), a.sgd_epochs,
                                        a.sgd_batch_size, a.sgd_lr, config.seed)
  else:
    raise config_lib.ConfigError(f"align.method {a.method!r}: expected closed_form or sgd")
  results = {}
  for name, (xs, ys) in (("fit", (x, y)), ("heldout", (x_test, y_test))):
    for key, value in aligner_lib.evaluate(aligner_lib.in_batches(xs, ys), weights,
                                           bias).items():
      results[f"align/{name}_{key}"] = value
  if jax.process_index() == 0:
    np.savez(os.path.join(workdir, ALIGNER), W=weights.astype(np.float32),
             b=bias.astype(np.float32))
  writer.write(1, results)
  return weights, bias, results


def zero_shot(config, towers, context, evals) -> dict[str, float]:
  """Every zero-shot evaluator three ways: CLIP, AgriCLIP (aligned DINO) and their mix."""
  w = config.align.mix_weight

  def mix_images(params, images):  # Dot products with [t, t] give the mixed logits.
    return jnp.concatenate([(1 - w) * towers.aligned(params, images),
                            w * two_towers.l2_normalize(towers.clip_images(params, images))], -1)

  def mix_texts(params, tokens):
    text = two_towers.l2_normalize(towers.texts(params, tokens))
    return jnp.concatenate([text, text], -1)

  results = {}
  for way, encode_images, encode_texts in (
      ("clip", towers.clip_images, towers.texts), ("agriclip", towers.aligned, towers.texts),
      ("mix", mix_images, mix_texts)):
    ctx = evaluators.Context(**{**context.__dict__, "encode_images": encode_images,
                                "encode_texts": encode_texts})
    for name, _, evaluator in evaluators.build(evals, ctx, 1):
      for key, value in evaluator.run(towers.params).items():
        results[f"{name}/{way}/{key}"] = value
  return results


def train(config: ml_collections.ConfigDict, workdir: str):
  summary_path = os.path.join(workdir, loop_lib.SUMMARY)
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      logging.info("%s already finished; nothing to do.", workdir)
      return json.load(f)
  common.check_values(config)
  common.run_requirements(config, workdir)
  mesh = sharding.make_mesh(config.mesh)
  towers = Towers(config, workdir, mesh)
  a = config.align
  writer = metrics_lib.Writer(workdir)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=1))
  towers.params["aligner"] = {"W": jnp.zeros((1, 1)), "b": jnp.zeros(1)}  # Shape placeholder.
  context = evaluators.Context(
      mesh=mesh, params_sharding=towers.replicated, params_abstract=None,
      encode_images=towers.aligned, encode_texts=towers.texts, tokenizer=towers.tokenizer,
      dataset=config.input.dataset, data_dir=config.input.data_dir or None,
      image_size=towers.image_size,
      batch_size=config.eval_batch_size or config.input.batch_size,
      num_threads=config.input.num_threads)
  sharding.batch_size_per_shard(mesh, context.batch_size)
  if a.aligner_workdir:
    path = os.path.join(config_lib.expand_path(a.aligner_workdir, workdir), ALIGNER)
    if not os.path.exists(path):
      raise config_lib.ConfigError(f"align.aligner_workdir has no {ALIGNER} ({path})")
    with np.load(path) as saved:
      weights, bias = saved["W"], saved["b"]
    results = {}
  else:
    weights, bias, results = fit(config, towers, context, workdir, writer)
  towers.params["aligner"] = jax.device_put({"W": jnp.asarray(weights), "b": jnp.asarray(bias)},
                                            towers.replicated)
  context.params_abstract = jax.eval_shape(lambda p: p, towers.params)
  results.update(zero_shot(config, towers, context, config.evals))
  writer.write(1, results)
  writer.close()
  summary = {"step": 1, **{k: float(v) for k, v in results.items()}}
  if jax.process_index() == 0:
    with open(summary_path + ".tmp", "w") as f:
      json.dump(summary, f, indent=1)
    os.replace(summary_path + ".tmp", summary_path)
  return summary
