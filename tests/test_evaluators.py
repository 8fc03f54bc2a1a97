"""Evaluation metrics against numpy, and every example counted exactly once."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from agriclip_jax import config_lib
from agriclip_jax import sharding
from agriclip_jax.evaluators import base
from agriclip_jax.evaluators import classification
from agriclip_jax.evaluators import zeroshot
from agriclip_jax.input import datasets
from agriclip_jax.input import preprocess
from agriclip_jax.input import tokenizer as tokenizer_lib


def numpy_metrics(logits, labels, num_classes):
  order = np.argsort(-logits, axis=1, kind="stable")  # ties: lower index first
  top1 = order[:, 0] == labels
  top5 = np.any(order[:, :5] == labels[:, None], axis=1)
  recalls = [top1[labels == c].mean() for c in range(num_classes) if np.any(labels == c)]
  return top1.mean(), top5.mean(), np.mean(recalls)


def test_counts_match_numpy_with_ties_masks_and_empty_classes():
  rng = np.random.default_rng(0)
  logits = rng.integers(0, 3, (40, 9)).astype(np.float32)  # Many exact ties.
  labels = rng.integers(0, 7, 40)  # Classes 7 and 8 have no examples.
  mask = np.ones(40, bool)
  mask[-5:] = False  # Padding rows must not count.
  counts = jax.tree.map(np.asarray, classification.classification_counts(
      jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask), k=5))
  metrics = classification.summarize(counts, 35, "test")
  top1, top5, recall = numpy_metrics(logits[:35], labels[:35], 9)
  np.testing.assert_allclose([metrics["top1"], metrics["top5"],
                              metrics["mean_per_class_recall"]], [top1, top5, recall])
  assert metrics["num_examples"] == 35 and metrics["num_classes"] == 9
  with pytest.raises(AssertionError, match="evaluated 35 examples, the split has 36"):
    classification.summarize(counts, 36, "test")


def _context(mesh, encode_images, encode_texts=None, tokenizer=None, batch_size=32):
  return base.Context(mesh=mesh, params_sharding=sharding.replicated(mesh),
                      params_abstract={}, encode_images=encode_images, encode_texts=encode_texts,
                      tokenizer=tokenizer, dataset="agri_synthetic/small", data_dir=None,
                      image_size=16, batch_size=batch_size)


PROJECTION = np.random.default_rng(0).normal(size=(3, 72)).astype(np.float32)


def mean_colour_scores(params, images):
  """A fixed 'classifier': class scores from the image's mean colour."""
  del params
  return jnp.mean(images.astype(jnp.float32) / 255, axis=(1, 2)) @ PROJECTION


@pytest.mark.parametrize("batch_size", [32, 8])
def test_classification_evaluator_counts_every_example_once(data_dir, batch_size):
  mesh = sharding.make_mesh([("data", 8)])
  context = _context(mesh, mean_colour_scores, batch_size=batch_size)
  context.data_dir = data_dir
  config = ml_collections.ConfigDict(dict(classification.default_config(), split="heldout",
                                          classes="present"))
  evaluator = classification.Evaluator("heldout", config, context)
  metrics = evaluator.run(params={})
  # Reference: every image of the split, scored in numpy, without batching.
  source = datasets.data_source(datasets.builder("agri_synthetic/small", data_dir), "heldout")
  images = np.stack([preprocess.eval_image(source[i]["image"], 16) for i in range(len(source))])
  labels = np.array([source[i]["label"] for i in range(len(source))])
  present = sorted(set(labels))
  logits = np.asarray(mean_colour_scores(None, images))[:, present]
  top1, top5, recall = numpy_metrics(logits, np.searchsorted(present, labels), len(present))
  assert metrics["num_examples"] == len(source) == 48  # Not a multiple of the batch of 32.
  np.testing.assert_allclose([metrics["top1"], metrics["top5"],
                              metrics["mean_per_class_recall"]], [top1, top5, recall],
                             rtol=1e-6)


def test_zero_shot_class_embeddings_average_normalised_prompts(data_dir):
  texts = ["a photo of a red plain leaf.", "green striped fish", "white spotted cattle"]
  tok = tokenizer_lib.from_trained(tokenizer_lib.train_bpe(texts * 4, 300), 16)
  table = np.random.default_rng(1).normal(size=(tok.vocab_size, 6)).astype(np.float32)

  def encode_texts(params, tokens):
    del params
    return jnp.asarray(table)[tokens].sum(1) / 3.0  # Deliberately not unit norm.

  mesh = sharding.make_mesh([("data", 8)])
  context = _context(mesh, lambda p, x: None, encode_texts, tok)
  context.data_dir = data_dir
  config = ml_collections.ConfigDict(dict(zeroshot.default_config(), split="heldout",
                                          classes=["red spotted leaf", "green plain fish"],
                                          templates=["a {}.", "a photo of the {}!"]))
  evaluator = zeroshot.Evaluator("zs", config, context)
  with pytest.raises(config_lib.ConfigError, match="not among the evaluated classes"):
    evaluator.run({})  # heldout has other classes too
  got = np.asarray(evaluator.prepare({}))
  for row, name in zip(got, ["red spotted leaf", "green plain fish"]):
    prompts = [f"a {name}.", f"a photo of the {name}!"]
    vectors = table[tok.encode(prompts)].sum(1) / 3.0
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    want = vectors.mean(0) / np.linalg.norm(vectors.mean(0))
    np.testing.assert_allclose(row, want, rtol=1e-5, atol=1e-6)


def test_evaluator_and_model_mismatches_are_config_errors(data_dir):
  mesh = sharding.make_mesh([("data", 8)])
  embeddings = lambda params, images: jnp.zeros((images.shape[0], 32))  # An image tower.
  context = _context(mesh, embeddings)
  context.data_dir = data_dir
  config = ml_collections.ConfigDict(dict(classification.default_config(), split="heldout"))
  with pytest.raises(config_lib.ConfigError, match=r"gives 32 values per image, not one per "
                                                   r"class of .*\(72\)"):
    classification.Evaluator("heldout", config, context)
  with pytest.raises(config_lib.ConfigError, match="needs a text tower"):
    zeroshot.Evaluator("heldout", ml_collections.ConfigDict(zeroshot.default_config()),
                       context)
  config.classes = "bogus"
  context.encode_images = mean_colour_scores
  with pytest.raises(config_lib.ConfigError,
                     match=r"unknown classes \['bogus'\].*classes is 'all', 'present', a list"):
    classification.Evaluator("heldout", config, context)
