"""Parameter paths: the `img/encoder/block00/attn/query/kernel` strings that rules match."""

from typing import Any

import flax


def path_str(path) -> str:
  """A `jax.tree_util` key path -> "a/b/0/c"."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in path)


def flatten(params) -> dict[str, Any]:
  return flax.traverse_util.flatten_dict(params, sep="/")


def unflatten(flat: dict[str, Any]):
  return flax.traverse_util.unflatten_dict(flat, sep="/")
