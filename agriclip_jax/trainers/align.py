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


from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from agriclip_jax import config_lib
from agriclip_jax import distributed
from agriclip_jax import files
from agriclip_jax import runs
from agriclip_jax import sharding
from agriclip_jax.evaluators import base as evaluators
from agriclip_jax.evaluators import embeddings
from agriclip_jax.input import datasets
from agriclip_jax.input import pipeline
from agriclip_jax.models import aligner as aligner_lib
from agriclip_jax.models import two_towers
from agriclip_jax.trainers import common
from agriclip_jax.trainers import loop as loop_lib

OPEN_FIELDS = ("evals",)
KEY = "align_key.json"  # What the run's summary was computed from.


def default_config() -> ml_collections.ConfigDict:
  config = common.base_config()
  config.trainer = "align"
  config.total_steps = 1  # Unused: alignment is a fit, not training steps.
  config.align = dict(
      # The DINO run whose teacher's backbone features are aligned, or a pretrained image
      # checkpoint (e.g. DINO's ResNet-50, as AgriCLIP's released aligners use); the CLIP run
      # or checkpoint whose image embeddings are the target and whose text tower prompts.
      dino_workdir="{workdir}/../dino",
      clip_workdir="{workdir}/../clip",
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


def _features(towers, context, split_source, name, directory, batch_size, max_examples):
  """(DINO features, CLIP embeddings) of a split, from the cache or computed and cached.

  The cache is keyed by both runs (paths, steps), the image size and `name` (dataset, split,
  rows), so changed inputs are never served stale features."""
  name = f"{name}_{towers.key}"
  paths = {k: files.join(directory, f"{name}_{k}.npy") for k in ("dino", "clip")}
  if all(distributed.exists_everywhere(p) for p in paths.values()):
    return tuple(files.load_array(paths[k]) for k in ("dino", "clip"))
  transform = pipeline.EvalTransform(towers.image_size)
  out = {}
  for key, encode in (("dino", towers.dino_features), ("clip", towers.clip_images)):
    out[key] = embeddings.embed_split(context, towers.params, split_source, transform,
                                      batch_size, encode, max_examples)["embedding"]
  if jax.process_index() == 0:
    files.path(directory).mkdir(parents=True, exist_ok=True)
    for key, path in paths.items():
      files.save_array(path, out[key].astype(np.float32))
  return out["dino"], out["clip"]


def fit(config, towers, context, workdir, writer):
  """(W, b, MSE and R^2 on the fit and held-out splits); process 0 saves W and b.

  Every process holds every feature row and fits the same aligner, deterministically.
  """
  a = config.align
  builder = datasets.builder(config.input.dataset, config.input.data_dir or None)
  batch_size = context.batch_size
  cache = files.join(workdir, "features")
  name = builder.info.full_name.replace("/", "_")
  x, y = _features(towers, context, datasets.data_source(builder, a.fit_split),
                   f"{name}_{a.fit_split}_{a.max_examples or 'all'}", cache, batch_size,
                   a.max_examples)
  x_test, y_test = _features(towers, context, datasets.data_source(builder, a.heldout_split),
                             f"{name}_{a.heldout_split}_all", cache, batch_size, 0)
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
    files.save_arrays(files.join(workdir, runs.ALIGNER), W=weights.astype(np.float32),
                      b=bias.astype(np.float32))
  writer.write(1, results)
  return weights, bias, results


def mix_image_embeddings(agriclip, clip, weight: float):
  """[(1 - w) a, w c]: its dot product with `mix_text_embeddings(t)` is the mixed logit
  (1 - w) a.t + w c.t, so the mix is scored by the unchanged zero-shot evaluator."""
  return jnp.concatenate([(1 - weight) * agriclip, weight * clip], axis=-1)


def mix_text_embeddings(text):
  """[t, t] (its norm, sqrt(2) |t|, is the same for every class: rankings do not change)."""
  return jnp.concatenate([text, text], axis=-1)


def zero_shot(config, towers, context, evals) -> dict[str, float]:
  """Every zero-shot evaluator three ways: CLIP, AgriCLIP (aligned DINO) and their mix."""
  w = config.align.mix_weight

  def mix_images(params, images):
    return mix_image_embeddings(towers.aligned(params, images),
                                two_towers.l2_normalize(towers.clip_images(params, images)), w)

  def mix_texts(params, tokens):
    return mix_text_embeddings(two_towers.l2_normalize(towers.texts(params, tokens)))

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
  summary_path, key_path = (files.path(workdir) / n for n in (loop_lib.SUMMARY, KEY))
  if summary_path.exists() and key_path.exists():
    stored_key = files.read_json(key_path)
    if stored_key["config"] == config_lib.fingerprint(config.to_dict()):
      logging.info("%s already finished; nothing to do.", workdir)
      return files.read_json(summary_path)
    logging.info("%s: the config changed since its summary; redoing it", workdir)
  if config.align.method not in ("closed_form", "sgd"):
    raise config_lib.ConfigError(f"align.method {config.align.method!r}: expected closed_form "
                                 "or sgd")
  mesh = common.begin(config, workdir)
  towers = runs.AgriCLIPTowers(config, workdir, mesh)
  a = config.align
  writer = common.open_workdir(config, workdir)
  context = evaluators.Context(
      mesh=mesh, params_sharding=towers.params_sharding, params_abstract=None,
      encode_images=towers.aligned, encode_texts=towers.texts, tokenizer=towers.tokenizer,
      dataset=config.input.dataset, data_dir=config.input.data_dir or None,
      image_size=towers.image_size,
      batch_size=config.eval_batch_size or config.input.batch_size,
      num_threads=config.input.num_threads)
  sharding.batch_size_per_shard(mesh, context.batch_size)
  if a.aligner_workdir:
    weights, bias, _ = runs.load_aligner(config, workdir)
    results = {}
  else:
    weights, bias, results = fit(config, towers, context, workdir, writer)
  towers.params["aligner"] = jax.device_put({"W": jnp.asarray(weights), "b": jnp.asarray(bias)},
                                            towers.replicated)
  context.params_abstract = jax.eval_shape(lambda p: p, towers.params)
  results.update(zero_shot(config, towers, context, config.evals))
  writer.write(1, results)
  writer.close()
  summary = {"step": 0, **{k: float(v) for k, v in results.items()}}
  if jax.process_index() == 0:
    loop_lib.write_summary(workdir, summary)
    files.write_json(key_path, {"config": config_lib.fingerprint(config.to_dict()),
                                "runs": towers.key}, indent=None)
  return summary
