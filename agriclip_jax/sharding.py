"""Device mesh, sharding rules and global batches (jit + NamedSharding; no pmap).

`config.mesh` lists `(axis name, size)` pairs, one size may be -1 ("the rest"). Batches are
split over the batch axes (`data` and `fsdp`). Parameters follow `config.sharding_rules`, a
list of `(regex over parameter path, strategy)` pairs: `"replicate"`, `"fsdp"` (split the
largest dimension that the `fsdp` axis divides, for arrays of at least `fsdp_min_size`
elements) or an explicit tuple of axis names / None per dimension. Optimizer state follows the
parameter it belongs to.
"""

from typing import Any, Sequence

import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from agriclip_jax import config_lib
from agriclip_jax.pytree import path_str

BATCH_AXES = ("data", "fsdp")


def _check_pairs(entries, field: str, example: str) -> None:
  """A mesh or rule list typed on the command line may be malformed: one line, not an unpack
  error deep in a trainer."""
  if not isinstance(entries, (list, tuple)) or any(
      not isinstance(entry, (list, tuple)) or len(entry) != 2 for entry in entries):
    raise config_lib.ConfigError(f"{field}={entries!r}: expected a list of pairs, e.g. {example}")


def make_mesh(axes: Sequence[tuple[str, int]], devices=None) -> Mesh:
  _check_pairs(axes, "config.mesh", '[("data", -1), ("fsdp", 2)]')
  devices = jax.devices() if devices is None else devices
  names = [name for name, _ in axes]
  sizes = [int(size) for _, size in axes]
  if sizes.count(-1) > 1:
    raise config_lib.ConfigError(f"mesh {axes}: at most one axis may have size -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise config_lib.ConfigError(f"mesh {axes} cannot split {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise config_lib.ConfigError(
        f"mesh {dict(zip(names, sizes))} needs {int(np.prod(sizes))} devices; there are "
        f"{len(devices)}")
  return Mesh(mesh_utils.create_device_mesh(sizes, devices=devices,
                                            allow_split_physical_axes=True), names)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  return tuple(a for a in mesh.axis_names if a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the batch axes."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_size_per_shard(mesh: Mesh, global_batch: int) -> int:
  shards = int(np.prod([mesh.shape[a] for a in batch_axes(mesh)]))
  if global_batch % shards:
    raise config_lib.ConfigError(
        f"batch size {global_batch} is not divisible by the {shards} batch shards of mesh "
        f"{dict(mesh.shape)}")
  return global_batch // shards


def _fsdp_spec(shape, mesh: Mesh, min_size: int) -> P:
  axis_size = mesh.shape.get("fsdp", 1)
  if axis_size == 1 or int(np.prod(shape)) < min_size:
    return P()
  for dim in np.argsort(shape)[::-1]:  # largest dimension first
    if shape[dim] % axis_size == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def _spec(strategy, shape, mesh: Mesh, min_size: int) -> P:
  if strategy == "replicate":
    return P()
  if strategy == "fsdp":
    return _fsdp_spec(shape, mesh, min_size)
  if isinstance(strategy, (tuple, list)):
    if len(strategy) != len(shape):
      raise config_lib.ConfigError(
          f"sharding spec {strategy} does not fit an array of shape {shape}")
    return P(*strategy)
  raise config_lib.ConfigError(f"unknown sharding strategy {strategy!r}")


def param_shardings(mesh: Mesh, params_shape, rules, min_size: int = 2**14):
  """NamedSharding per parameter from the first rule whose regex fullmatches its path."""
  _check_pairs(rules, "config.sharding_rules", '[("img/.*", "fsdp"), (".*", "replicate")]')
  compiled = [(config_lib.compile_regex(pattern, "config.sharding_rules"), strategy)
              for pattern, strategy in rules]

  def one(path, leaf):
    name = path_str(path)
    for regex, strategy in compiled:
      if regex.fullmatch(name):
        return NamedSharding(mesh, _spec(strategy, leaf.shape, mesh, min_size))
    raise config_lib.ConfigError(
        f"parameter {name} is covered by no sharding rule (config.sharding_rules)")

  return jax.tree_util.tree_map_with_path(one, params_shape)


def follow_params(mesh: Mesh, tree_shape, params_shape, params_sharding,
                  min_size: int = 2**14):
  """Shardings for a tree (optimizer state) whose leaves mirror parameters.

  A leaf whose path ends with a parameter's path and has its shape gets that parameter's
  sharding (Adam moments); any other leaf is split like an fsdp parameter if large (factored
  statistics) and replicated otherwise (counters).
  """
  by_path = {}
  for (path, shape), sharding in zip(
      jax.tree_util.tree_leaves_with_path(params_shape),
      jax.tree.leaves(params_sharding)):
    by_path[path_str(path)] = (shape.shape, sharding)

  def one(path, leaf):
    parts = path_str(path).split("/")
    for i in range(len(parts)):
      match = by_path.get("/".join(parts[i:]))
      if match and match[0] == leaf.shape:
        return match[1]
    return NamedSharding(mesh, _fsdp_spec(leaf.shape, mesh, min_size))

  return jax.tree_util.tree_map_with_path(one, tree_shape)


def global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, Any]:
  """This process's rows of every array -> global arrays split over the batch axes."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x),
                      local_batch)
