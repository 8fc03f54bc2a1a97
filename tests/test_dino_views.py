"""DINO's multi-crop views keep every device's rows on it (no collectives to lay them out)."""

import re

import jax
import jax.numpy as jnp
import numpy as np

from agriclip_jax import sharding
from agriclip_jax.trainers import dino

COLLECTIVES = re.compile(r"all-to-all|collective-permute|all-gather")


def _batch(num_local=2, n=16):
  rng = np.random.default_rng(0)
  crops = {"global_0": (n, 8), "global_1": (n, 8)}
  crops.update({f"local_{i}": (n, 4) for i in range(num_local)})
  return {k: rng.normal(size=shape).astype(np.float32) for k, shape in crops.items()}


def test_split_views_gives_back_each_view_in_order():
  batch = _batch()
  global_views, local_views = dino.views(batch, 2)
  for out, key in zip(dino.split_views(global_views, 2) + dino.split_views(local_views, 2),
                      ["global_0", "global_1", "local_0", "local_1"]):
    np.testing.assert_array_equal(out, batch[key])
  assert dino.views(batch, 0)[1] is None


def _compiled_collectives(layout):
  mesh = sharding.make_mesh([("data", 8)])
  batch = jax.device_put(_batch(), sharding.batch_sharding(mesh))
  weights = jnp.ones((8, 3))

  def per_view(batch):  # A per-example tower on both views, then the views apart again.
    views, split = layout(batch)
    return split(jnp.tanh(views @ weights))

  hlo = jax.jit(per_view).lower(batch).compile().as_text()
  return len(COLLECTIVES.findall(hlo))


def test_views_need_no_collectives_where_concatenation_needs_several():
  stacked = lambda b: (dino.views(b, 0)[0], lambda x: dino.split_views(x, 2))
  concatenated = lambda b: (jnp.concatenate([b["global_0"], b["global_1"]]),
                            lambda x: jnp.split(x, 2))
  assert _compiled_collectives(stacked) == 0
  assert _compiled_collectives(concatenated) > 0  # What the layout avoids.
