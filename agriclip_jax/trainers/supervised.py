"""Supervised image classification: `config.trainer = "supervised"`.

Trains the image tower with a softmax head over the dataset's labels. Its checkpoints are
what a LiT run locks when no pretrained weights are at hand (`config.init` copies `img/...`).
"""

import functools

import jax
import ml_collections
import optax

from agriclip_jax import config_lib
from agriclip_jax.input import pipeline
from agriclip_jax.input import preprocess
from agriclip_jax.models import classifier
from agriclip_jax.trainers import common
from agriclip_jax.trainers import step as step_lib

OPEN_FIELDS = ("evals", "model.img")


def default_config() -> ml_collections.ConfigDict:
  """Every field this trainer reads, with its default."""
  config = common.base_config()
  config.trainer = "supervised"
  config.model = dict(img=dict(preset="", variant="B/16", pool_type="gap"), dtype="float32")
  config.label_smoothing = 0.0
  return config


def train(config: ml_collections.ConfigDict, workdir: str):
  done = common.finished(config, workdir)
  if done is not None:
    return done
  if config.input.mixture:
    raise config_lib.ConfigError("the supervised trainer takes one dataset (input.dataset), "
                                 "not input.mixture")
  setup = common.Setup.create(config, workdir, feature_keys=("image_key", "label_key"))
  num_classes = setup.train_builder.info.features[config.input.label_key].num_classes
  model = classifier.make(config.model, num_classes)
  image_size = config.input.image_size

  def model_init(rng):
    return model.init(rng, jax.numpy.zeros((1, image_size, image_size, 3)))["params"]

  spec, tx, lr_schedule = setup.state_spec(model_init)
  normalize = functools.partial(preprocess.normalize, mean=config.input.mean,
                                std=config.input.std)

  def objective(params, batch, rng):
    logits = model.apply({"params": params}, normalize(batch["image"]), train=True,
                         rngs={"dropout": rng})
    targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], num_classes),
                                  config.label_smoothing)
    loss = optax.softmax_cross_entropy(logits, targets).mean()
    return loss, {"accuracy": (logits.argmax(-1) == batch["label"]).mean()}

  def make_transform(component):
    return pipeline.TrainTransform(
        image_size=image_size, image_key=component["image_key"],
        label_key=component["label_key"], crop_scale=tuple(config.input.crop_scale),
        flip=config.input.flip)

  def encode_images(params, images):
    return model.apply({"params": params}, normalize(images))

  return setup.run(spec, step_lib.train_step(objective, tx, spec.labels, lr_schedule),
                   make_transform, encode_images)
