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
