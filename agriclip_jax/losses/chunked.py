"""The contrastive losses over the global batch without its N x N logit matrix.

Under `shard_map` over the batch axes each device holds n = N / shards examples. It gathers the
other side's embeddings (N x d: small beside N x N) and walks over them `chunk` columns at a
time, keeping only running per-row statistics: the softmax's log-sum-exp (online, with a
running maximum), the sum and count of a row's matching logits, the best column so far (for the
in-batch accuracy). At most n x chunk logits exist at once, in the forward pass and in the
backward pass, which recomputes each chunk's logits instead of storing them (`jax.checkpoint`).
So per-device loss memory is O(n * chunk + N * d) instead of O(N * N): what lets a global batch
of 32k fit.

The plain forms in `losses.contrastive` are the reference: these equal them, loss, gradients and
metrics, on any number of devices (tests/test_chunked_losses.py). Matching pairs come from
per-example keys (`contrastive.keys`) rather than an N x N mask, so the label-aware targets
compose with chunking.
"""

import functools

import jax
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp

from agriclip_jax import config_lib
from agriclip_jax import sharding
from agriclip_jax.losses import contrastive


def _same(row_keys, col_keys):
  """[n, c] bool: row i's key equals column j's (keys: [n, k] and [c, k])."""
  return jnp.all(row_keys[:, None, :] == col_keys[None, :, :], axis=-1)


def _sweep(rows, cols, offset, scale, bias, keys, dup_keys, chunk, weight, sigmoid, axes,
           precision):
  """Per-row statistics of this device's rows against all N columns, `chunk` at a time.

  rows: [n, d] (global indices offset..offset+n); cols: [N, d]; keys / dup_keys: (row keys,
  column keys) of the matching pairs (None: the diagonal) and of each duplicate kind to count;
  axes: the mesh axes the rows vary over.
  """
  n, num_cols = rows.shape[0], cols.shape[0]
  num_chunks = num_cols // chunk
  row_ids = offset + jnp.arange(n)
  split = lambda x: x.reshape(num_chunks, chunk, *x.shape[1:])
  xs = (jnp.arange(num_chunks), split(cols),
        None if keys is None else split(keys[1]),
        {name: split(c) for name, (_, c) in dup_keys.items()})

  def body(carry, x):
    j, block, block_keys, block_dups = x
    logits = jnp.einsum("id,td->it", rows, block, precision=precision) * scale
    if bias is not None:
      logits = logits + bias
    eye = row_ids[:, None] == (j * chunk + jnp.arange(chunk))[None, :]
    positive = eye if keys is None else _same(keys[0], block_keys)
    out = dict(carry)
    if sigmoid:
      target = jnp.where(eye, 1.0, jnp.where(positive, weight, 0.0)).astype(logits.dtype)
      out["loss"] = carry["loss"] - jnp.sum(target * jax.nn.log_sigmoid(logits)
                                            + (1 - target) * jax.nn.log_sigmoid(-logits), 1)
    else:
      m = jax.lax.stop_gradient(jnp.maximum(carry["max"], jnp.max(logits, 1)))
      out["max"] = m
      out["sumexp"] = (carry["sumexp"] * jnp.exp(carry["max"] - m)
                       + jnp.sum(jnp.exp(logits - m[:, None]), 1))
      out["pos_sum"] = carry["pos_sum"] + jnp.sum(jnp.where(positive, logits, 0.0), 1)
    out["pos_count"] = carry["pos_count"] + jnp.sum(positive, 1)
    # Metrics only: no gradients. Ties keep the first column, as argmax does.
    flat = jax.lax.stop_gradient(logits)
    out["total"] = carry["total"] + jnp.sum(flat)
    out["pos_logits"] = carry["pos_logits"] + jnp.sum(jnp.where(positive, flat, 0.0))
    best = jnp.argmax(flat, 1)
    value = jnp.take_along_axis(flat, best[:, None], 1)[:, 0]
    better = value > carry["best"]
    out["best"] = jnp.where(better, value, carry["best"])
    out["best_positive"] = jnp.where(better, jnp.take_along_axis(positive, best[:, None], 1)[:, 0],
                                     carry["best_positive"])
    for name, (row_dup, _) in dup_keys.items():
      out["dup/" + name] = carry["dup/" + name] + jnp.sum(_same(row_dup, block_dups[name]))
    return out, None

  zeros = jnp.zeros((n,), jnp.float32)
  init = {"pos_count": zeros, "total": jnp.zeros(()), "pos_logits": jnp.zeros(()),
          "best": jnp.full((n,), -jnp.inf), "best_positive": jnp.zeros((n,), bool),
          **{"dup/" + name: jnp.zeros((), jnp.float32) for name in dup_keys}}
  if sigmoid:
    init["loss"] = zeros
  else:
    init.update(sumexp=zeros, pos_sum=zeros)
  # Constants that the scan turns into per-device values must say so up front.
  init = jax.tree.map(lambda x: jax.lax.pcast(x, axes, to="varying"), init)
  if not sigmoid:
    # The running maximum starts at the row's own logit (finite), so no -inf - -inf.
    own = jnp.einsum("id,id->i", rows, jax.lax.dynamic_slice_in_dim(cols, offset, n),
                     precision=precision) * scale
    if bias is not None:
      own = own + bias
    init["max"] = jax.lax.stop_gradient(own)
  stats, _ = jax.lax.scan(jax.checkpoint(body), init, xs)
  if not sigmoid:
    lse = stats["max"] + jnp.log(stats["sumexp"])
    own_logp = own - lse
    spread = stats["pos_sum"] / stats["pos_count"] - lse
    stats["loss"] = -(own_logp if weight == 0 else spread if weight == 1
                      else (1 - weight) * own_logp + weight * spread)
  return stats


def check_chunk(chunk: int, global_batch: int) -> int:
  """The chunk size used for a global batch (`chunk` above it: the whole batch)."""
  if chunk < 0:
    raise config_lib.ConfigError(f"config.loss_chunk_size must be >= 0; got {chunk}")
  chunk = min(chunk, global_batch)
  if global_batch % chunk:
    raise config_lib.ConfigError(
        f"config.loss_chunk_size={chunk} does not divide the global batch {global_batch}")
  return chunk


def loss(name: str, zimg, ztxt, scale, bias, keys: dict[str, jax.Array], *, mesh, chunk: int,
         targets: str = "pairs", weight: float = 1.0, logit_precision: str = "highest"):
  """(loss, metrics) of `losses.contrastive.get(name)` over the global batch, in chunks.

  zimg, ztxt: [N, d] split over the mesh's batch axes; keys: `contrastive.keys(batch)`.
  """
  contrastive.get(name)
  contrastive.check_targets(targets, weight)
  sigmoid = name == "sigmoid"
  if sigmoid:
    contrastive.require_bias(bias)
  axes = sharding.batch_axes(mesh)
  if not axes:
    raise config_lib.ConfigError(
        f"chunked losses split the batch over a 'data' or 'fsdp' mesh axis; mesh {mesh.shape}")
  num = zimg.shape[0]
  chunk = check_chunk(chunk, num)
  if targets != "pairs" and targets not in keys:
    raise config_lib.ConfigError(
        f"config.loss_targets={targets!r}: the batch has no {targets[:-1]} to match by")
  scalars = {"scale": scale} if bias is None else {"scale": scale, "bias": bias}

  def local(zimg, ztxt, scalars, keys):
    n = zimg.shape[0]
    offset = jax.lax.axis_index(axes) * n
    gather = functools.partial(jax.lax.all_gather, axis_name=axes, tiled=True)
    both = {name: (k, gather(k)) for name, k in keys.items()}
    pos = None if targets == "pairs" else both[targets]
    sweep = functools.partial(_sweep, offset=offset, scale=scalars["scale"],
                              bias=scalars.get("bias"), keys=pos, chunk=chunk,
                              weight=weight, sigmoid=sigmoid, axes=axes,
                              precision=contrastive.precision(logit_precision))
    rows = sweep(zimg, gather(ztxt), dup_keys=both)
    if sigmoid:  # The loss is one sum over all pairs; the other way round is only a metric.
      cols = sweep(*map(jax.lax.stop_gradient, (ztxt, gather(zimg))), dup_keys={})
    else:
      cols = sweep(ztxt, gather(zimg), dup_keys={})
    total = lambda x: jax.lax.psum(jnp.sum(x), axes)
    pos_count = total(rows["pos_count"])
    metrics = {
        "logits/positive": total(rows["pos_logits"]) / pos_count,
        "logits/negative": ((total(rows["total"]) - total(rows["pos_logits"]))
                            / jnp.maximum(num * num - pos_count, 1)),
        "batch_accuracy/img2txt": total(rows["best_positive"]) / num,
        "batch_accuracy/txt2img": total(cols["best_positive"]) / num,
    }
    for name in keys:
      metrics[f"targets/same_{name[:-1]}_fraction"] = (
          (jax.lax.psum(rows["dup/" + name], axes) - num) / max(num * (num - 1), 1))
    if sigmoid:
      return total(rows["loss"]) / num, metrics
    img2txt, txt2img = total(rows["loss"]) / num, total(cols["loss"]) / num
    metrics.update({"loss/img2txt": img2txt, "loss/txt2img": txt2img})
    return (img2txt + txt2img) / 2, metrics

  batch = P(axes)
  return jax.shard_map(local, mesh=mesh, in_specs=(batch, batch, P(), batch),
                       out_specs=(P(), P()))(zimg, ztxt, scalars, keys)
