"""Exact contrastive gradients of a global batch too large for one forward-backward pass.

A contrastive loss couples every example of the batch with every other, so averaging the
gradients of micro-batches (plain gradient accumulation) optimises a different objective: each
micro-batch's examples would only be contrasted with each other. The embedding-cache method
(Gao et al., 2021, "GradCache") keeps the objective:

1. embed every micro-batch without keeping activations (no gradients);
2. compute the loss over all embeddings of the global batch, and its gradient with respect to
   each embedding (and the logit scale/bias), which is small: N x d;
3. run each micro-batch's towers again with gradients, pulling back its embeddings' gradients
   through them (a vector-Jacobian product), and sum the parameter gradients.

The result is the full batch's gradient (to float rounding), while activations exist for one
micro-batch at a time. The towers' forward pass runs twice: about a third more compute.
Micro-batch i takes rows i, i + k, i + 2k, ... of every device's share, so each is split over
all devices. With dropout, each micro-batch draws its own mask (the same in both passes).
"""

from typing import Callable

import jax
import jax.numpy as jnp

from agriclip_jax import config_lib
from agriclip_jax import optim

SCALARS = ("logit_scale", "logit_bias")


def check(micro_batches: int, rows_per_shard: int) -> None:
  if micro_batches < 1:
    raise config_lib.ConfigError(f"config.micro_batches must be >= 1; got {micro_batches}")
  if rows_per_shard % micro_batches:
    raise config_lib.ConfigError(
        f"config.micro_batches={micro_batches} does not divide the {rows_per_shard} examples "
        "each batch shard holds")


def value_and_grad(embed: Callable, loss_and_metrics: Callable, norm_metrics: Callable,
                   micro_batches: int):
  """(trainable, frozen, batch, rng) -> ((loss, metrics), gradients of the trainable params).

  embed(params, batch, rng) -> (zimg, ztxt, extras); loss_and_metrics(zimg, ztxt, extras,
  batch) -> (loss, metrics) over the global batch; norm_metrics(extras) -> per-batch metrics
  of the embeddings.
  """
  k = micro_batches

  def split(x):  # [N, ...] -> [k, N / k, ...]: micro-batch i is rows i, i + k, ...
    return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)

  def unsplit(x):
    return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])

  def outputs(params, micro, rng):
    zimg, ztxt, extras = embed(params, micro, rng)
    return (zimg, ztxt, {key: extras[key] for key in SCALARS if key in extras}), extras

  def fn(trainable, frozen, batch, rng):
    params = optim.merge(trainable, frozen)
    micro = jax.tree.map(split, batch)
    rngs = jax.random.split(rng, k)

    def first(_, x):
      (zimg, ztxt, scalars), extras = outputs(params, *x)
      return None, (zimg, ztxt, scalars, norm_metrics(extras))

    _, (zimg, ztxt, scalars, norms) = jax.lax.scan(first, None, (micro, rngs))
    zimg, ztxt = jax.lax.stop_gradient((unsplit(zimg), unsplit(ztxt)))
    scalars = jax.tree.map(lambda x: jax.lax.stop_gradient(x[0]), scalars)  # Same in each.

    def loss(zimg, ztxt, scalars):
      return loss_and_metrics(zimg, ztxt, scalars, batch)

    (value, metrics), (g_img, g_txt, g_scalars) = jax.value_and_grad(
        loss, argnums=(0, 1, 2), has_aux=True)(zimg, ztxt, scalars)
    # Each micro-batch's pass sees the scale once: a k-th of its gradient each sums to all.
    g_scalars = jax.tree.map(lambda g: g / k, g_scalars)

    def second(total, x):
      micro_batch, micro_rng, g_zimg, g_ztxt = x
      _, pull_back = jax.vjp(
          lambda t: outputs(optim.merge(t, frozen), micro_batch, micro_rng)[0], trainable)
      (grads,) = pull_back((g_zimg, g_ztxt, g_scalars))
      return jax.tree.map(jnp.add, total, grads), None

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    grads, _ = jax.lax.scan(second, zeros, (micro, rngs, split(g_img), split(g_txt)))
    metrics.update(jax.tree.map(jnp.mean, norms))
    return (value, metrics), grads

  return fn
