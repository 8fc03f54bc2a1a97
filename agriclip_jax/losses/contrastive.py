"""Image-text contrastive losses over the global batch.

Written on global arrays: under `jax.jit` with a batch-sharded input, the compiler gathers the
embeddings it needs, so every example is contrasted with the whole global batch however many
devices or processes hold it.
"""

import jax
import jax.numpy as jnp

from agriclip_jax import config_lib


def _logits(zimg, ztxt, scale, bias):
  logits = jnp.einsum("id,td->it", zimg, ztxt, precision=jax.lax.Precision.HIGHEST) * scale
  return logits if bias is None else logits + bias


def logit_metrics(logits) -> dict[str, jax.Array]:
  """Mean logit of matching pairs, of non-matching pairs, and in-batch retrieval accuracy."""
  n = logits.shape[0]
  eye = jnp.eye(n, dtype=bool)
  return {
      "logits/positive": jnp.mean(jnp.diagonal(logits)),
      "logits/negative": jnp.sum(jnp.where(eye, 0.0, logits)) / max(n * (n - 1), 1),
      "batch_accuracy/img2txt": jnp.mean(jnp.argmax(logits, axis=1) == jnp.arange(n)),
      "batch_accuracy/txt2img": jnp.mean(jnp.argmax(logits, axis=0) == jnp.arange(n)),
  }


def softmax_loss(zimg, ztxt, scale, bias=None):
  """CLIP: cross-entropy of each image over all texts and of each text over all images."""
  logits = _logits(zimg, ztxt, scale, bias)
  img2txt = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=1)))
  txt2img = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=0)))
  loss = (img2txt + txt2img) / 2
  return loss, {"loss/img2txt": img2txt, "loss/txt2img": txt2img, **logit_metrics(logits)}


def sigmoid_loss(zimg, ztxt, scale, bias):
  """SigLIP: every (image, text) pair is a binary problem; summed per image, mean over images."""
  if bias is None:
    raise config_lib.ConfigError(
        "the sigmoid loss needs a learned bias (set model.logit_bias_init, e.g. -10)")
  logits = _logits(zimg, ztxt, scale, bias)
  labels = 2 * jnp.eye(logits.shape[0], dtype=logits.dtype) - 1
  loss = -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / logits.shape[0]
  return loss, logit_metrics(logits)


LOSSES = {"softmax": softmax_loss, "sigmoid": sigmoid_loss}


def get(name: str):
  if name not in LOSSES:
    raise config_lib.ConfigError(
        f"unknown contrastive loss {name!r}; expected one of {list(LOSSES)}")
  return LOSSES[name]
