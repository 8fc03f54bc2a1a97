"""Image-text contrastive losses over the global batch.

Written on global arrays: under `jax.jit` with a batch-sharded input, the compiler gathers the
embeddings it needs, so every example is contrasted with the whole global batch however many
devices or processes hold it.
"""

import jax
import jax.numpy as jnp
import numpy as np

from agriclip_jax import config_lib


# `config.logit_precision`: the precision of the image-text similarity matmul. "highest" is
# float32 throughout; "default" lets GPUs/TPUs use their faster reduced-precision passes
# (TF32, bfloat16), which is what their throughput figures assume.
PRECISIONS = {"highest": jax.lax.Precision.HIGHEST, "high": jax.lax.Precision.HIGH,
              "default": jax.lax.Precision.DEFAULT}


def precision(name: str) -> jax.lax.Precision:
  if name not in PRECISIONS:
    raise config_lib.ConfigError(
        f"config.logit_precision must be one of {list(PRECISIONS)}; got {name!r}")
  return PRECISIONS[name]


def _logits(zimg, ztxt, scale, bias, precision_name="highest"):
  logits = jnp.einsum("id,td->it", zimg, ztxt, precision=precision(precision_name)) * scale
  return logits if bias is None else logits + bias


# Which pairs of a batch count as matching (`config.loss_targets`): only each example's own
# pair; every pair whose examples share a label (a class, a species); every pair whose texts
# are identical token for token.
TARGETS = ("pairs", "labels", "texts")

# Two multipliers of a polynomial hash of token ids (mod 2**32). Texts count as identical when
# both hashes agree: a false match needs a 64-bit collision, about n**2 / 2**64 per batch of n.
_TEXT_HASH_BASES = (1_000_003, 2_654_435_761)


def text_keys(tokens: jax.Array) -> jax.Array:
  """[n, 2] uint32 hashes of each row of token ids: equal rows give equal keys."""
  length = tokens.shape[-1]
  powers = np.array([[pow(b, k, 2**32) for b in _TEXT_HASH_BASES] for k in range(length)],
                    np.uint32)
  return jnp.sum(tokens.astype(jnp.uint32)[:, :, None] * jnp.asarray(powers)[None], axis=1,
                 dtype=jnp.uint32)


def same(keys: jax.Array) -> jax.Array:
  """[n, n] bool: rows i and j of `keys` ([n] or [n, k]) are equal."""
  keys = keys.reshape(keys.shape[0], -1)
  return jnp.all(keys[:, None, :] == keys[None, :, :], axis=-1)


def keys(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """[n, k] per-example keys for the targets other than `pairs` that the batch can tell: two
  examples match by "labels" when their `label` is the same, by "texts" when their `text` token
  rows are identical."""
  out = {}
  if "label" in batch:
    out["labels"] = batch["label"].reshape(batch["label"].shape[0], -1)
  if "text" in batch:
    out["texts"] = text_keys(batch["text"])
  return out


def matches(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """[n, n] bool masks of the pairs that match by a target other than `pairs` (see `keys`)."""
  return {name: same(k) for name, k in keys(batch).items()}


def check_targets(targets: str, weight: float = 1.0) -> None:
  if targets not in TARGETS:
    raise config_lib.ConfigError(
        f"config.loss_targets must be one of {list(TARGETS)}; got {targets!r}")
  if not 0 <= weight <= 1:
    raise config_lib.ConfigError(
        f"config.loss_targets_weight must be between 0 and 1; got {weight}")


def positives(targets: str, masks: dict[str, jax.Array]) -> jax.Array | None:
  """The [n, n] mask of matching pairs for `targets` out of `matches(batch)` (None: the
  diagonal, `pairs`)."""
  check_targets(targets)
  return None if targets == "pairs" else masks[targets]


def duplicate_fractions(masks: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Fraction of the batch's off-diagonal pairs sharing a label / an identical text (from
  `matches(batch)`): the pairs the standard (`pairs`) losses treat as negatives although they
  match."""
  out = {}
  for targets, mask in masks.items():
    n = mask.shape[0]
    out[f"targets/same_{targets[:-1]}_fraction"] = (jnp.sum(mask) - n) / max(n * (n - 1), 1)
  return out


def logit_metrics(logits, positive=None) -> dict[str, jax.Array]:
  """Mean logit of matching pairs, of non-matching pairs, and in-batch retrieval accuracy
  (the best-scoring text of an image, and image of a text, is one of its matches)."""
  n = logits.shape[0]
  positive = jnp.eye(n, dtype=bool) if positive is None else positive
  rows = jnp.arange(n)
  num_positive = jnp.sum(positive)
  return {
      "logits/positive": jnp.sum(jnp.where(positive, logits, 0.0)) / num_positive,
      "logits/negative": (jnp.sum(jnp.where(positive, 0.0, logits))
                          / jnp.maximum(n * n - num_positive, 1)),
      "batch_accuracy/img2txt": jnp.mean(positive[rows, jnp.argmax(logits, axis=1)]),
      "batch_accuracy/txt2img": jnp.mean(positive[jnp.argmax(logits, axis=0), rows]),
  }


def softmax_loss(zimg, ztxt, scale, bias=None, positive=None, weight=1.0,
                 logit_precision="highest"):
  """CLIP: cross-entropy of each image over all texts and of each text over all images.

  With a `positive` mask ([n, n], true on the diagonal) the target of each row (column) is
  spread over its matches: `weight` of it evenly over all of them, `1 - weight` on its own
  pair. Without one, or when the mask is the diagonal, this is CLIP's loss exactly.
  """
  logits = _logits(zimg, ztxt, scale, bias, logit_precision)
  n = logits.shape[0]
  eye = jnp.eye(n, dtype=bool)
  positive = eye if positive is None else positive
  losses = []
  for axis in (1, 0):
    log_p = jax.nn.log_softmax(logits, axis=axis)
    own = jnp.diagonal(log_p)
    spread = (jnp.sum(jnp.where(positive, log_p, 0.0), axis=axis)
              / jnp.sum(positive, axis=axis))
    losses.append(-jnp.mean(own if weight == 0 else
                            spread if weight == 1 else (1 - weight) * own + weight * spread))
  img2txt, txt2img = losses
  loss = (img2txt + txt2img) / 2
  return loss, {"loss/img2txt": img2txt, "loss/txt2img": txt2img,
                **logit_metrics(logits, positive)}


def require_bias(bias) -> None:
  if bias is None:
    raise config_lib.ConfigError(
        "the sigmoid loss needs a learned bias (set model.logit_bias_init, e.g. -10)")


def sigmoid_loss(zimg, ztxt, scale, bias, positive=None, weight=1.0,
                 logit_precision="highest"):
  """SigLIP: every (image, text) pair is a binary problem; summed per image, mean over images.

  Pairs in `positive` ([n, n]) other than an example's own are matches with target `weight`
  (1: a positive like the own pair; between 0 and 1: a soft target). Without a mask this is
  SigLIP's loss exactly.
  """
  require_bias(bias)
  logits = _logits(zimg, ztxt, scale, bias, logit_precision)
  eye = jnp.eye(logits.shape[0], dtype=bool)
  if positive is None or weight == 0:
    labels = 2 * eye.astype(logits.dtype) - 1
    loss = -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / logits.shape[0]
  else:
    target = jnp.where(eye, 1.0, jnp.where(positive, weight, 0.0)).astype(logits.dtype)
    loss = -jnp.sum(target * jax.nn.log_sigmoid(logits)
                    + (1 - target) * jax.nn.log_sigmoid(-logits)) / logits.shape[0]
  return loss, logit_metrics(logits, positive)


LOSSES = {"softmax": softmax_loss, "sigmoid": sigmoid_loss}


def get(name: str):
  if name not in LOSSES:
    raise config_lib.ConfigError(
        f"unknown contrastive loss {name!r}; expected one of {list(LOSSES)}")
  return LOSSES[name]
