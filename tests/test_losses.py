"""Contrastive losses against plain numpy references."""

import numpy as np
import pytest

from agriclip_jax.losses import contrastive


def _embeddings(n=12, d=8, seed=0):
  rng = np.random.default_rng(seed)
  zimg = rng.normal(size=(n, d)).astype(np.float32)
  ztxt = (zimg + 0.7 * rng.normal(size=(n, d))).astype(np.float32)
  zimg /= np.linalg.norm(zimg, axis=1, keepdims=True)
  ztxt /= np.linalg.norm(ztxt, axis=1, keepdims=True)
  return zimg, ztxt


def _log_softmax(x, axis):
  x = x.astype(np.float64)
  m = x.max(axis=axis, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def numpy_softmax_loss(zimg, ztxt, scale, bias):
  logits = scale * zimg.astype(np.float64) @ ztxt.T.astype(np.float64) + (bias or 0.0)
  n = len(logits)
  img2txt = -np.mean([_log_softmax(logits, 1)[i, i] for i in range(n)])
  txt2img = -np.mean([_log_softmax(logits, 0)[i, i] for i in range(n)])
  return (img2txt + txt2img) / 2, img2txt, txt2img, logits


def numpy_sigmoid_loss(zimg, ztxt, scale, bias):
  logits = scale * zimg.astype(np.float64) @ ztxt.T.astype(np.float64) + bias
  total = 0.0
  for i in range(len(logits)):
    for j in range(len(logits)):
      label = 1.0 if i == j else -1.0
      total += np.log1p(np.exp(-label * logits[i, j]))  # -log sigmoid(label * logit)
  return total / len(logits), logits


@pytest.mark.parametrize("scale,bias", [(1.0, None), (10.0, None), (14.3, -2.0)])
def test_softmax_loss_matches_numpy(scale, bias):
  zimg, ztxt = _embeddings()
  loss, metrics = contrastive.softmax_loss(zimg, ztxt, scale, bias)
  ref, img2txt, txt2img, logits = numpy_softmax_loss(zimg, ztxt, scale, bias)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss/img2txt"], img2txt, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss/txt2img"], txt2img, rtol=1e-5)
  off_diagonal = logits[~np.eye(len(logits), dtype=bool)]
  np.testing.assert_allclose(metrics["logits/positive"], np.diag(logits).mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["logits/negative"], off_diagonal.mean(), rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(metrics["batch_accuracy/img2txt"],
                             np.mean(logits.argmax(1) == np.arange(len(logits))))


def test_softmax_loss_is_symmetric_in_towers():
  zimg, ztxt = _embeddings(seed=3)
  a, _ = contrastive.softmax_loss(zimg, ztxt, 5.0)
  b, _ = contrastive.softmax_loss(ztxt, zimg, 5.0)
  np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("scale,bias", [(10.0, -10.0), (3.0, 0.5)])
def test_sigmoid_loss_matches_numpy(scale, bias):
  zimg, ztxt = _embeddings(seed=1)
  loss, metrics = contrastive.sigmoid_loss(zimg, ztxt, scale, bias)
  ref, logits = numpy_sigmoid_loss(zimg, ztxt, scale, bias)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  np.testing.assert_allclose(metrics["logits/positive"], np.diag(logits).mean(), rtol=1e-5)


def test_perfect_alignment_gives_low_loss_and_full_accuracy():
  zimg, _ = _embeddings(n=6, d=16, seed=2)
  loss, metrics = contrastive.softmax_loss(zimg, zimg, 100.0)
  assert float(loss) < 1e-3
  assert float(metrics["batch_accuracy/txt2img"]) == 1.0


def test_sigmoid_loss_needs_a_bias():
  zimg, ztxt = _embeddings()
  with pytest.raises(ValueError, match="logit_bias_init"):
    contrastive.sigmoid_loss(zimg, ztxt, 10.0, None)


# Label-aware targets (config.loss_targets): same-label pairs are matches, not negatives.

LABELS = np.array([3, 1, 3, 0, 1, 3, 2, 5, 4, 0, 6, 3])  # Rows with 1, 2 and 4 matches.


def numpy_multi_positive_softmax(zimg, ztxt, scale, labels, weight):
  logits = scale * zimg.astype(np.float64) @ ztxt.T.astype(np.float64)
  n = len(logits)
  match = labels[:, None] == labels[None, :]
  directions = []
  for log_p, mask in ((_log_softmax(logits, 1), match), (_log_softmax(logits, 0).T, match.T)):
    total = 0.0
    for i in range(n):
      target = weight * mask[i] / mask[i].sum()
      target[i] += 1 - weight
      total -= np.sum(target * log_p[i])
    directions.append(total / n)
  return (directions[0] + directions[1]) / 2, directions


def numpy_multi_positive_sigmoid(zimg, ztxt, scale, bias, labels, weight):
  logits = scale * zimg.astype(np.float64) @ ztxt.T.astype(np.float64) + bias
  total = 0.0
  for i in range(len(logits)):
    for j in range(len(logits)):
      target = 1.0 if i == j else weight if labels[i] == labels[j] else 0.0
      total -= (target * -np.log1p(np.exp(-logits[i, j]))
                + (1 - target) * -np.log1p(np.exp(logits[i, j])))
  return total / len(logits)


@pytest.mark.parametrize("weight", [1.0, 0.3])
def test_multi_positive_softmax_matches_numpy(weight):
  zimg, ztxt = _embeddings(seed=4)
  positive = contrastive.same(LABELS)
  loss, metrics = contrastive.softmax_loss(zimg, ztxt, 7.0, None, positive, weight)
  ref, (img2txt, txt2img) = numpy_multi_positive_softmax(zimg, ztxt, 7.0, LABELS, weight)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss/img2txt"], img2txt, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss/txt2img"], txt2img, rtol=1e-5)
  plain, _ = contrastive.softmax_loss(zimg, ztxt, 7.0)
  assert abs(float(loss) - float(plain)) > 1e-2  # The targets do change the loss here.


@pytest.mark.parametrize("weight", [1.0, 0.3])
def test_multi_positive_sigmoid_matches_numpy(weight):
  zimg, ztxt = _embeddings(seed=5)
  positive = contrastive.same(LABELS)
  loss, _ = contrastive.sigmoid_loss(zimg, ztxt, 10.0, -3.0, positive, weight)
  ref = numpy_multi_positive_sigmoid(zimg, ztxt, 10.0, -3.0, LABELS, weight)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)


@pytest.mark.parametrize("name,bias", [("softmax", None), ("sigmoid", -4.0)])
def test_all_distinct_labels_give_the_plain_losses_exactly(name, bias):
  zimg, ztxt = _embeddings(seed=6)
  loss_fn = contrastive.get(name)
  plain, plain_metrics = loss_fn(zimg, ztxt, 9.0, bias)
  positive = contrastive.same(np.arange(len(zimg))[::-1])
  labelled, metrics = loss_fn(zimg, ztxt, 9.0, bias, positive, 1.0)
  np.testing.assert_array_equal(labelled, plain)
  for key in ("batch_accuracy/img2txt", "batch_accuracy/txt2img"):
    np.testing.assert_array_equal(metrics[key], plain_metrics[key])


def test_batch_accuracy_counts_any_match():
  zimg, _ = _embeddings(n=4, d=8, seed=7)
  ztxt = zimg[[1, 0, 2, 3]]  # Images 0 and 1 find each other's text: right only by label.
  _, pairs = contrastive.softmax_loss(zimg, ztxt, 50.0)
  _, labels = contrastive.softmax_loss(zimg, ztxt, 50.0, None,
                                       contrastive.same(np.array([0, 0, 1, 2])))
  assert float(pairs["batch_accuracy/img2txt"]) == 0.5
  assert float(labels["batch_accuracy/img2txt"]) == 1.0


def test_text_targets_match_identical_token_rows_only():
  tokens = np.array([[5, 9, 2, 0], [5, 9, 2, 0], [9, 5, 2, 0], [5, 9, 2, 7], [5, 9, 2, 0]],
                    np.int32)
  masks = contrastive.matches({"text": tokens, "label": np.array([0, 0, 1, 1, 2])})
  mask = np.asarray(contrastive.positives("texts", masks))
  expected = (tokens[:, None, :] == tokens[None, :, :]).all(-1)
  np.testing.assert_array_equal(mask, expected)
  fractions = contrastive.duplicate_fractions(masks)
  np.testing.assert_allclose(fractions["targets/same_text_fraction"], 6 / 20)
  np.testing.assert_allclose(fractions["targets/same_label_fraction"], 4 / 20)


def test_unknown_targets_are_refused():
  with pytest.raises(ValueError, match="loss_targets"):
    contrastive.positives("classes", {})


@pytest.mark.parametrize("name,bias", [("softmax", None), ("sigmoid", -4.0)])
def test_label_targets_over_8_devices_equal_1_device(name, bias):
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  zimg, ztxt = _embeddings(n=32, d=8, seed=8)
  labels = np.random.default_rng(0).integers(0, 6, size=32).astype(np.int32)
  tokens = np.random.default_rng(1).integers(0, 3, size=(32, 3)).astype(np.int32)
  loss_fn = contrastive.get(name)

  def loss(zimg, ztxt, labels, tokens):
    batch = {"label": labels, "text": tokens}
    masks = contrastive.matches(batch)
    out = {t: loss_fn(zimg, ztxt, 9.0, bias, contrastive.positives(t, masks), 0.8)[0]
           for t in ("labels", "texts")}
    return out, contrastive.duplicate_fractions(masks)

  one = jax.jit(loss)(zimg, ztxt, labels, tokens)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  rows = NamedSharding(mesh, P("data"))
  assert len(jax.devices()) >= 8
  sharded = jax.jit(loss)(*(jax.device_put(x, rows) for x in (zimg, ztxt, labels, tokens)))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), one, sharded)


def test_label_offsets_keep_each_datasets_classes_apart():
  import types  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from agriclip_jax.trainers import contrastive as trainer  # pylint: disable=g-import-not-at-top

  def source(name, **features):
    info = types.SimpleNamespace(full_name=name, features=tfds.features.FeaturesDict(features))
    return types.SimpleNamespace(info=info), None, {"label_key": "label"}

  text = tfds.features.Text()
  alive = source("alive", label=tfds.features.ClassLabel(num_classes=7), captions=text)
  inat = source("inat", label=tfds.features.ClassLabel(num_classes=3), captions=text)
  bare = source("captions_only", captions=text)
  config = trainer.default_config()
  config.loss_targets = "labels"
  assert trainer.label_offsets(config, [alive, inat, alive]) == [0, 7, 10]
  with pytest.raises(ValueError, match="loss_targets='labels'.*captions_only has no such"):
    trainer.label_offsets(config, [alive, bare])
  config.loss_targets = "pairs"  # Without labels everywhere, no batch carries them.
  assert trainer.label_offsets(config, [alive, bare]) == [None, None]
