"""Evaluation metrics on embeddings and scores, in numpy (the evaluation suite's maths).

Conventions shared with the streaming evaluators: ties rank the lower class index first;
mean per-class recall averages over the classes that have examples.
"""

import numpy as np


def ranking(scores: np.ndarray) -> np.ndarray:
  """Class indices by decreasing score per row; equal scores keep the lower index first."""
  return np.argsort(-scores, axis=1, kind="stable")


def classification(scores: np.ndarray, labels: np.ndarray, k: int = 5) -> dict[str, float]:
  """top-1, top-k and mean per-class recall of [n, classes] scores."""
  order = ranking(scores)
  correct = order[:, 0] == labels
  present = np.unique(labels)
  return {"top1": float(correct.mean()),
          f"top{k}": float(np.any(order[:, :k] == labels[:, None], axis=1).mean()),
          "mean_per_class_recall": float(np.mean([correct[labels == c].mean()
                                                  for c in present]))}


def confusion(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
  """[true class, predicted class] counts."""
  out = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(out, (labels, predictions), 1)
  return out


def softmax(logits: np.ndarray) -> np.ndarray:
  logits = logits - logits.max(axis=1, keepdims=True)
  e = np.exp(logits)
  return e / e.sum(axis=1, keepdims=True)


def rank_probabilities(species_probs: np.ndarray, taxon_of_class: np.ndarray,
                       num_taxa: int) -> np.ndarray:
  """[n, taxa] probabilities: each taxon's is the sum of its species' probabilities."""
  out = np.zeros((len(species_probs), num_taxa))
  for species, taxon in enumerate(taxon_of_class):
    out[:, taxon] += species_probs[:, species]
  return out


def _top_k(sims: np.ndarray, k: int) -> np.ndarray:
  """The k highest columns of each row, best first (equal scores: lower index first)."""
  k = min(k, sims.shape[1])
  part = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < sims.shape[1] else \
      np.tile(np.arange(sims.shape[1]), (len(sims), 1))
  order = np.lexsort((part, -np.take_along_axis(sims, part, axis=1)), axis=1)
  return np.take_along_axis(part, order, axis=1)


def retrieval(image_embeddings: np.ndarray, text_embeddings: np.ndarray,
              image_of_text: np.ndarray, ks=(1, 5, 10), chunk: int = 1024) -> dict[str, float]:
  """Recall@k both ways (rows L2-normalised). An image has several texts: image->text counts a
  hit if any of its texts is in the top k; text->image if its image is. Computed in chunks
  of rows, never the whole similarity matrix at once."""
  k_max = max(ks)
  image_hits = {k: 0 for k in ks}
  for start in range(0, len(image_embeddings), chunk):
    top = _top_k(image_embeddings[start:start + chunk] @ text_embeddings.T, k_max)
    own = np.arange(start, start + len(top))[:, None]
    for k in ks:
      image_hits[k] += int(np.any(image_of_text[top[:, :k]] == own, axis=1).sum())
  text_hits = {k: 0 for k in ks}
  for start in range(0, len(text_embeddings), chunk):
    top = _top_k(text_embeddings[start:start + chunk] @ image_embeddings.T, k_max)
    own = image_of_text[start:start + len(top), None]
    for k in ks:
      text_hits[k] += int(np.any(top[:, :k] == own, axis=1).sum())
  out = {}
  for k in ks:
    out[f"image_to_text_recall@{k}"] = image_hits[k] / len(image_embeddings)
    out[f"text_to_image_recall@{k}"] = text_hits[k] / len(text_embeddings)
  return out


def fit_logistic(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float,
                 steps: int = 200) -> tuple[np.ndarray, np.ndarray]:
  """Multinomial logistic regression, mean cross-entropy + l2 / 2 * |W|^2 (bias free), by
  full-batch L-BFGS. Returns (W [d, classes], b [classes])."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  x = jnp.asarray(x, jnp.float32)
  targets = jax.nn.one_hot(jnp.asarray(y), num_classes)

  def objective(params):
    logits = x @ params["W"] + params["b"]
    loss = -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1))
    return loss + 0.5 * l2 * jnp.sum(params["W"] ** 2)

  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(objective)

  @jax.jit
  def run(params):
    def step(carry, _):
      params, state = carry
      value, grad = value_and_grad(params, state=state)
      updates, state = solver.update(grad, state, params, value=value, grad=grad,
                                     value_fn=objective)
      return (optax.apply_updates(params, updates), state), None
    return jax.lax.scan(step, (params, solver.init(params)), None, length=steps)[0][0]

  params = run({"W": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros(num_classes)})
  return np.asarray(params["W"], np.float64), np.asarray(params["b"], np.float64)


def linear_probe(train, val, test, num_classes: int,
                 l2_grid=(1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)) -> dict[str, float]:
  """Chooses the L2 weight on `val` (top-1), refits on train + val, scores `test`.

  Each of train / val / test is (embeddings, labels); embeddings are standardised with the
  training statistics first.
  """
  mean, std = train[0].mean(0), train[0].std(0) + 1e-6
  z = lambda a: (a - mean) / std
  best = max(l2_grid, key=lambda l2: classification(
      _logits(z(val[0]), *fit_logistic(z(train[0]), train[1], num_classes, l2)), val[1])[
          "top1"])
  weights, bias = fit_logistic(z(np.concatenate([train[0], val[0]])),
                               np.concatenate([train[1], val[1]]), num_classes, best)
  return {**classification(_logits(z(test[0]), weights, bias), test[1]), "l2": best}


def _logits(x, weights, bias):
  return np.asarray(x, np.float64) @ weights + bias
