"""Contrastive image-text training (CLIP, SigLIP, LiT): `config.trainer = "contrastive"`.

LiT is this trainer with the image tower frozen by `optim.rules` and initialised from a
pretrained run by `config.init`.
"""

import functools
import os

import jax
import ml_collections

from agriclip_jax import config_lib
from agriclip_jax import files
from agriclip_jax import sharding
from agriclip_jax.input import pipeline
from agriclip_jax.input import preprocess
from agriclip_jax.input import tokenizer as tokenizer_lib
from agriclip_jax.losses import chunked
from agriclip_jax.losses import contrastive as losses
from agriclip_jax.models import two_towers
from agriclip_jax.trainers import common
from agriclip_jax.trainers import grad_cache
from agriclip_jax.trainers import image_cache
from agriclip_jax.trainers import state as state_lib
from agriclip_jax.trainers import step as step_lib

# Free-form fields checked elsewhere: evaluator configs and tower keyword arguments.
OPEN_FIELDS = ("evals", "model.img", "model.txt")


def default_config() -> ml_collections.ConfigDict:
  """Every field this trainer reads, with its default."""
  config = common.base_config()
  config.trainer = "contrastive"
  config.tokenizer = dict(
      path="",  # A pretrained tokenizer directory; "" = train a BPE on the captions.
      vocab_size=8192,  # Size of the trained BPE.
      max_len=32,
      max_examples=200_000,  # Examples whose captions train the BPE.
  )
  config.model = dict(
      img=dict(preset="", variant="B/16", pool_type="gap", head=True),
      txt=dict(preset="", variant="B", head=True),
      out_dim=512,
      logit_scale_init=10.0,
      logit_bias_init=None,
      max_logit_scale=100.0,
      dtype="float32",
  )
  config.model.logit_bias_init = ml_collections.FieldReference(None, field_type=float)
  config.loss = "softmax"  # softmax (CLIP) | sigmoid (SigLIP)
  # Which pairs are matches (losses.contrastive.TARGETS): "pairs" (each example's own only, as
  # in CLIP and SigLIP), "labels" (every pair sharing input.label_key: captions generated per
  # class or species are not negatives of each other) or "texts" (identical token ids).
  config.loss_targets = "pairs"
  # Share of each row's target on its other matches (1: they count fully; below 1: a soft
  # target, the rest staying on the own pair).
  config.loss_targets_weight = 1.0
  # 0: the loss builds the global batch's N x N logits (the reference form). >0: each device
  # computes its own rows against the gathered batch this many columns at a time
  # (losses.chunked): the same loss and gradients with O(N / devices * chunk) logit memory, for
  # global batches in the tens of thousands. Must divide the global batch (or exceed it).
  config.loss_chunk_size = 0
  # >1: each step embeds the global batch in this many micro-batches and gets the full batch's
  # exact gradient from them (trainers/grad_cache.py), holding activations for one at a time;
  # the towers' forward pass runs twice. Must divide each batch shard's examples.
  config.micro_batches = 1
  # Precision of the loss's image-text matmul (losses.contrastive.PRECISIONS): "highest"
  # (float32) or "default" (the accelerator's fast reduced-precision passes).
  config.logit_precision = "highest"
  # LiT: train from the locked image trunk's features, computed once (trainers/image_cache).
  config.image_cache = image_cache.default_config()
  return config


def make_loss(loss_name: str, targets: str = "pairs", targets_weight: float = 1.0,
              chunk_size: int = 0, mesh=None, batch_size: int = 0,
              logit_precision: str = "highest"):
  """(zimg, ztxt, extras, batch) -> (loss, metrics) on a two-tower model's outputs; `targets`
  (see losses.TARGETS) says which pairs of the batch match; `chunk_size` > 0 computes the loss
  in chunks over `mesh`'s batch axes (losses.chunked) for global batches of `batch_size`."""
  loss_fn = losses.get(loss_name)
  losses.check_targets(targets, targets_weight)
  losses.precision(logit_precision)
  if chunk_size:
    chunked.check_chunk(chunk_size, batch_size)

  def loss_and_metrics(zimg, ztxt, extras, batch):
    scale, bias = extras["logit_scale"], extras.get("logit_bias")
    if chunk_size:
      loss, metrics = chunked.loss(loss_name, zimg, ztxt, scale, bias, losses.keys(batch),
                                   mesh=mesh, chunk=chunk_size, targets=targets,
                                   weight=targets_weight, logit_precision=logit_precision)
    else:
      masks = losses.matches(batch)
      loss, metrics = loss_fn(zimg, ztxt, scale, bias, losses.positives(targets, masks),
                              targets_weight, logit_precision)
      metrics.update(losses.duplicate_fractions(masks))
    metrics["logit_scale"] = scale
    if bias is not None:
      metrics["logit_bias"] = bias
    return loss, metrics

  return loss_and_metrics


def embed(model, normalize, params, batch, rng):
  """A training forward pass: (zimg, ztxt, extras)."""
  return model.apply({"params": params}, normalize(batch["image"]), batch["text"], train=True,
                     rngs={"dropout": rng})


def embed_cached(model, params, batch, rng):
  """A training forward pass from cached image trunk features (only the image head runs)."""
  return model.apply({"params": params}, None, batch["text"], train=True,
                     rngs={"dropout": rng}, image_features=batch[image_cache.FEATURES])


def norm_metrics(extras) -> dict:
  return {"img/norm": extras["img/norm"].mean(), "txt/norm": extras["txt/norm"].mean()}


def make_objective(model, loss_name: str, normalize, *loss_args, **loss_kwargs):
  """(params, batch, rng) -> (loss, metrics) for a two-tower model; the rest as `make_loss`."""
  return objective_of(model, normalize, make_loss(loss_name, *loss_args, **loss_kwargs))


def objective_of(model, normalize, loss_and_metrics, embed_fn=None):
  """`embed_fn(params, batch, rng)`: the forward pass (default `embed`)."""
  embed_fn = embed_fn or functools.partial(embed, model, normalize)

  def objective(params, batch, rng):
    zimg, ztxt, extras = embed_fn(params, batch, rng)
    loss, metrics = loss_and_metrics(zimg, ztxt, extras, batch)
    return loss, dict(metrics, **norm_metrics(extras))

  return objective


def make_step(config, model, normalize, mesh, tx, labels, lr_schedule,
              batch_size: int | None = None):
  """The train step a config describes: its loss (plain or chunked), with
  `config.micro_batches` > 1 the embedding-cache gradient, and with `config.image_cache`
  images replaced by their cached features. `batch_size`: the global batch (default
  `config.input.batch_size`)."""
  batch_size = batch_size or config.input.batch_size
  loss_and_metrics = make_loss(config.loss, config.loss_targets, config.loss_targets_weight,
                               config.loss_chunk_size, mesh, batch_size,
                               config.logit_precision)
  grad_cache.check(config.micro_batches, sharding.batch_size_per_shard(mesh, batch_size))
  embed_fn = (functools.partial(embed_cached, model) if config.image_cache.enabled
              else functools.partial(embed, model, normalize))
  value_and_grad = None
  if config.micro_batches > 1:
    value_and_grad = grad_cache.value_and_grad(embed_fn, loss_and_metrics, norm_metrics,
                                               config.micro_batches)
  return step_lib.train_step(objective_of(model, normalize, loss_and_metrics, embed_fn), tx,
                           labels, lr_schedule, value_and_grad)


def label_offsets(config, sources) -> list[int | None]:
  """Per training dataset, what its labels are shifted by so that datasets' classes stay
  apart in one batch (the classes of those before it); None where it has no label feature,
  and then the batch carries no labels.

  `loss_targets="labels"` needs a class label in every dataset: a ConfigError names the one
  without.
  """
  offsets, total = [], 0
  for builder, _, component in sources:
    key = component["label_key"]
    try:
      common.check_feature(builder, key, "input.label_key")
      feature = builder.info.features[key]
      num_classes = feature.num_classes
    except (config_lib.ConfigError, AttributeError, KeyError) as e:
      if config.loss_targets == "labels":
        reason = (str(e) if isinstance(e, config_lib.ConfigError)
                  else f"{builder.info.full_name}'s {key!r} is not a class label")
        raise config_lib.ConfigError(f"config.loss_targets='labels': {reason}") from None
      return [None] * len(sources)
    offsets.append(total)
    total += num_classes
  return offsets


def setup_with_text(config, workdir: str):
  """(Setup, tokenizer, two-tower model) of an image-text run; the tokenizer is saved in the
  workdir, where later stages (alignment, prediction) find it."""
  setup = common.Setup.create(config, workdir, feature_keys=("image_key", "text_key"))
  if ((files.path(workdir) / "tokenizer_layout.json").exists()
      and state_lib.latest_step(files.join(workdir, "checkpoints")) is not None):
    tokenizer = tokenizer_lib.load(workdir)  # A resumed run keeps the ids it trained with.
  else:
    tokenizer = common.make_tokenizer(config, setup.sources)
  if jax.process_index() == 0:
    tokenizer.save(workdir)
  return setup, tokenizer, two_towers.make(config.model, vocab_size=tokenizer.vocab_size)


def transforms(config, setup, tokenizer):
  """component -> its training transform: an image (with `config.image_cache`, one cached
  view of its features), a caption's tokens and, where the datasets have class labels, the
  label (shifted per dataset by `label_offsets`)."""
  offsets = label_offsets(config, setup.sources)
  by_dataset = {id(c): offset for (_, _, c), offset in zip(setup.sources, offsets)}

  def make_transform(component):
    offset = by_dataset[id(component)]
    return pipeline.TrainTransform(
        image_size=config.input.image_size, tokenize=tokenizer.encode,
        image_key=component["image_key"], text_key=component["text_key"],
        text_choice=component["text_choice"],
        label_key=None if offset is None else component["label_key"], label_offset=offset or 0,
        crop_scale=tuple(config.input.crop_scale), flip=config.input.flip,
        features_key=image_cache.FEATURES if config.image_cache.enabled else None)

  return make_transform


def use_image_cache(config, setup, model, normalize, spec):
  """Points the run's training sources at image caches; returns the `before_training` hook
  that builds (or finds) them from the state's locked image trunk."""
  image_cache.check_locked(spec.labels)
  originals = setup.sources
  setup.sources = [(b, image_cache.CachedSource(s), c) for b, s, c in originals]
  encode = image_cache.encoder(model, normalize)

  batch_size = config.eval_batch_size or config.input.batch_size

  def before_training(state):
    digest = image_cache.trunk_digest(state["params"])
    for (builder, source, component), (_, cached, _) in zip(originals, setup.sources):
      description = image_cache.describe(config, component, builder, source, model.image,
                                         digest, batch_size)
      root = (os.path.expanduser(config.image_cache.dir)
              or files.join(builder.data_dir, "image_cache"))
      cache = image_cache.build(
          files.join(root, image_cache.key_of(description)), source, description, encode,
          state["params"], setup.mesh, batch_size,
          dict(image_key=component["image_key"], image_size=config.input.image_size,
               seed=config.seed, crop_scale=tuple(config.input.crop_scale),
               flip=config.input.flip), config.input.num_threads)
      cached.attach(cache)

  return before_training


def train(config: ml_collections.ConfigDict, workdir: str):
  done = common.finished(config, workdir)
  if done is not None:
    return done
  if config.image_cache.enabled:  # Before any required run trains.
    image_cache.check(config.image_cache, two_towers.tower_kwargs(
        config.model.img, "img", config.model.out_dim, config.model.dtype, resnet_ok=True))
  setup, tokenizer, model = setup_with_text(config, workdir)
  image_size, text_len = config.input.image_size, config.tokenizer.max_len

  def model_init(rng):
    images = jax.numpy.zeros((1, image_size, image_size, 3), jax.numpy.float32)
    tokens = jax.numpy.zeros((1, text_len), jax.numpy.int32)
    return model.init(rng, images, tokens)["params"]

  spec, tx, lr_schedule = setup.state_spec(model_init)
  normalize = functools.partial(preprocess.normalize, mean=config.input.mean,
                                std=config.input.std)
  make_transform = transforms(config, setup, tokenizer)

  def encode_images(params, images):
    return model.apply({"params": params}, normalize(images), None)[0]

  def encode_texts(params, tokens):
    return model.apply({"params": params}, None, tokens)[1]

  before_training = None
  if config.image_cache.enabled:
    before_training = use_image_cache(config, setup, model, normalize, spec)
  step = make_step(config, model, normalize, setup.mesh, tx, spec.labels, lr_schedule)
  return setup.run(spec, step, make_transform, encode_images, encode_texts, tokenizer,
                   before_training)
