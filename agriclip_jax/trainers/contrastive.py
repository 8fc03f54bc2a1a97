"""Contrastive image-text training (CLIP, SigLIP, LiT): `config.trainer = "contrastive"`.

LiT is this trainer with the image tower frozen by `optim.rules` and initialised from a
pretrained run by `config.init`.
"""

import functools
import os

import jax
import ml_collections

from agriclip_jax.input import pipeline
from agriclip_jax.input import preprocess
from agriclip_jax.input import tokenizer as tokenizer_lib
from agriclip_jax.losses import contrastive as losses
from agriclip_jax.models import two_towers
from agriclip_jax.trainers import common
from agriclip_jax.trainers import state as state_lib

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
  return config


def make_objective(model, loss_name: str, normalize):
  """(params, batch, rng) -> (loss, metrics) for a two-tower model."""
  loss_fn = losses.get(loss_name)

  def objective(params, batch, rng):
    zimg, ztxt, extras = model.apply({"params": params}, normalize(batch["image"]),
                                     batch["text"], train=True, rngs={"dropout": rng})
    loss, metrics = loss_fn(zimg, ztxt, extras["logit_scale"], extras.get("logit_bias"))
    metrics["logit_scale"] = extras["logit_scale"]
    if "logit_bias" in extras:
      metrics["logit_bias"] = extras["logit_bias"]
    metrics["img/norm"] = extras["img/norm"].mean()
    metrics["txt/norm"] = extras["txt/norm"].mean()
    return loss, metrics

  return objective


def setup_with_text(config, workdir: str):
  """(Setup, tokenizer, two-tower model) of an image-text run; the tokenizer is saved in the
  workdir, where later stages (alignment, prediction) find it."""
  setup = common.Setup.create(config, workdir, feature_keys=("image_key", "text_key"))
  if (os.path.exists(os.path.join(workdir, "tokenizer_layout.json"))
      and state_lib.latest_step(os.path.join(workdir, "checkpoints")) is not None):
    tokenizer = tokenizer_lib.load(workdir)  # A resumed run keeps the ids it trained with.
  else:
    tokenizer = common.make_tokenizer(config, setup.sources)
  if jax.process_index() == 0:
    tokenizer.save(workdir)
  return setup, tokenizer, two_towers.make(config.model, vocab_size=tokenizer.vocab_size)


def train(config: ml_collections.ConfigDict, workdir: str):
  done = common.finished(config, workdir)
  if done is not None:
    return done
  setup, tokenizer, model = setup_with_text(config, workdir)
  image_size, text_len = config.input.image_size, config.tokenizer.max_len

  def model_init(rng):
    images = jax.numpy.zeros((1, image_size, image_size, 3), jax.numpy.float32)
    tokens = jax.numpy.zeros((1, text_len), jax.numpy.int32)
    return model.init(rng, images, tokens)["params"]

  spec, tx, lr_schedule = setup.state_spec(model_init)
  normalize = functools.partial(preprocess.normalize, mean=config.input.mean,
                                std=config.input.std)
  objective = make_objective(model, config.loss, normalize)

  def make_transform(component):
    return pipeline.TrainTransform(
        image_size=image_size, tokenize=tokenizer.encode, image_key=component["image_key"],
        text_key=component["text_key"], text_choice=component["text_choice"],
        crop_scale=tuple(config.input.crop_scale), flip=config.input.flip)

  def encode_images(params, images):
    return model.apply({"params": params}, normalize(images), None)[0]

  def encode_texts(params, tokens):
    return model.apply({"params": params}, None, tokens)[1]

  return setup.run(spec, common.train_step(objective, tx, spec.labels, lr_schedule),
                   make_transform, encode_images,
                   encode_texts, tokenizer)
