"""The cross-model aligner: y = x @ W + b, from DINO features x to CLIP image embeddings y.

Two fits:
- `fit_closed_form`: ridge least squares from Gram matrices accumulated batch by batch in
  float64 (any number of rows, one pass for feature statistics, one for the Grams). Features
  are standardised for conditioning and the standardisation is folded back exactly, so W and
  b apply to raw features and rescaling the inputs changes nothing but W's scale.
- `fit_sgd`: the published recipe, minibatch MSE with Adam for a number of epochs.

Batches are given as a callable returning a fresh iterator of (x [n, d_in], y [n, d_out]).
"""

from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

Batches = Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]


def _moments(batches: Batches):
  count, total, squares = 0, 0.0, 0.0
  for x, _ in batches():
    x = np.asarray(x, np.float64)
    count += len(x)
    total = total + x.sum(0)
    squares = squares + (x * x).sum(0)
  if not count:
    raise ValueError("no rows to fit the aligner on")
  mean = total / count
  std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
  return count, mean, np.where(std > 1e-12, std, 1.0)


def fit_closed_form(batches: Batches, ridge: float = 1e-6,
                    standardize: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """(W [d_in, d_out], b [d_out]) minimising |x W + b - y|^2 + ridge * n * |W'|^2.

  W' are the weights on standardised features (so `ridge` is scale-free); the bias is not
  penalised.
  """
  count, mean, std = _moments(batches) if standardize else (None, 0.0, 1.0)
  gram = cross = None
  rows = 0
  for x, y in batches():
    z = (np.asarray(x, np.float64) - mean) / std
    z = np.concatenate([z, np.ones((len(z), 1))], axis=1)  # Bias column.
    y = np.asarray(y, np.float64)
    gram = z.T @ z if gram is None else gram + z.T @ z
    cross = z.T @ y if cross is None else cross + z.T @ y
    rows += len(z)
  penalty = np.full(gram.shape[0], ridge * rows)
  penalty[-1] = 0.0  # No penalty on the bias.
  solution = np.linalg.solve(gram + np.diag(penalty), cross)
  weights_std, bias_std = solution[:-1], solution[-1]
  weights = weights_std / np.asarray(std)[:, None] if standardize else weights_std
  bias = bias_std - (np.asarray(mean) / np.asarray(std)) @ weights_std if standardize \
      else bias_std
  del count
  return weights, bias


def fit_sgd(x: np.ndarray, y: np.ndarray, epochs: int = 70, batch_size: int = 100,
            lr: float = 1e-3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Minibatch MSE regression with Adam (the published recipe); rows reshuffled per epoch."""
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  steps = len(x) // batch_size
  if steps < 1:
    raise ValueError(f"fit_sgd needs at least batch_size={batch_size} rows")
  params = {"W": jnp.zeros((x.shape[1], y.shape[1])), "b": jnp.zeros(y.shape[1])}
  tx = optax.adam(lr)

  def loss(p, xb, yb):
    return jnp.mean((xb @ p["W"] + p["b"] - yb) ** 2)

  @jax.jit
  def epoch(carry, key):
    order = jax.random.permutation(key, len(x))[:steps * batch_size].reshape(steps, -1)

    def step(carry, idx):
      p, opt_state = carry
      grads = jax.grad(loss)(p, x[idx], y[idx])
      updates, opt_state = tx.update(grads, opt_state, p)
      return (optax.apply_updates(p, updates), opt_state), None

    return jax.lax.scan(step, carry, order)[0]

  carry = (params, tx.init(params))
  for key in jax.random.split(jax.random.key(seed), epochs):
    carry = epoch(carry, key)
  return np.asarray(carry[0]["W"], np.float64), np.asarray(carry[0]["b"], np.float64)


def evaluate(batches: Batches, weights: np.ndarray, bias: np.ndarray) -> dict[str, float]:
  """MSE (mean over elements) and R^2 (1 - residual / total sum of squares about y's mean)."""
  count, y_sum, y_squares, residual = 0, 0.0, 0.0, 0.0
  for x, y in batches():
    y = np.asarray(y, np.float64)
    error = np.asarray(x, np.float64) @ weights + bias - y
    residual += float((error * error).sum())
    y_sum = y_sum + y.sum(0)
    y_squares = y_squares + (y * y).sum(0)
    count += len(y)
  total = float((y_squares - y_sum * y_sum / count).sum())
  return {"mse": residual / (count * len(bias)), "r2": 1.0 - residual / total,
          "rows": count}


def in_batches(x: np.ndarray, y: np.ndarray, batch_size: int = 65536) -> Batches:
  """Batches over arrays (memory-mapped ones are read a slice at a time)."""
  def batches():
    for start in range(0, len(x), batch_size):
      yield x[start:start + batch_size], y[start:start + batch_size]
  return batches
