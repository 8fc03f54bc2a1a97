"""Orbax checkpoints holding the train state and the data iterator together.

Each checkpoint is a step directory with two items: `state` (params, optimizer state, step,
RNG; saved asynchronously, each process writing its shards) and `data` (the grain iterator's
state, one file per process), so a resumed run continues with exactly the batch an
uninterrupted run would have seen next. The training iterator's state is its global stream
position (see `input/pipeline.py`), so a run may resume on another number of processes.
"""

import dataclasses
import json
import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from agriclip_jax.pytree import path_str


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model/optimizer the config describes."""


class _DataHandler(grain.checkpoint.CheckpointHandler):
  """Grain's handler; if this process layout wrote no file, restores from another process's.

  Valid because every process's training-iterator state is the same global position.
  """

  def restore(self, directory, item=None, args=None):
    item = item or args.item
    index, count = jax.process_index(), jax.process_count()
    if (directory / f"process_{index}-of-{count}.json").exists():
      return super().restore(directory, item=item, args=args)
    written = sorted(directory.glob("process_*-of-*.json"))
    if not written:
      raise CheckpointMismatchError(f"{directory} holds no data-iterator state")
    item.set_state(json.loads(written[0].read_text()))
    return item


@ocp.args.register_with_handler(_DataHandler, for_save=True)
@dataclasses.dataclass
class _DataSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(_DataHandler, for_restore=True)
@dataclasses.dataclass
class _DataRestore(ocp.args.CheckpointArgs):
  item: Any


class Checkpoints:

  def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": _DataHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator=None) -> None:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = _DataSave(data_iterator)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state, data_iterator=None):
    """The state at `step` laid out like `abstract_state`; also rewinds `data_iterator`."""
    self.check_compatible(step, abstract_state)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = _DataRestore(data_iterator)
    return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def check_compatible(self, step: int, abstract_state) -> None:
    stored = {path_str(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(
        self.manager.item_metadata(step)["state"].tree)}
    wanted = {path_str(p): leaf for p, leaf in
              jax.tree_util.tree_leaves_with_path(abstract_state)}
    problems = [f"{k} missing from the checkpoint" for k in wanted if k not in stored]
    problems += [f"{k} in the checkpoint but not in the model" for k in stored
                 if k not in wanted]
    problems += [f"{k}: checkpoint {tuple(stored[k].shape)} {np.dtype(stored[k].dtype)} vs "
                 f"config {tuple(wanted[k].shape)} {np.dtype(wanted[k].dtype)}"
                 for k in wanted if k in stored
                 and (tuple(stored[k].shape) != tuple(wanted[k].shape)
                      or np.dtype(stored[k].dtype) != np.dtype(wanted[k].dtype))]
    if problems:  # Parameters first: optimizer-state problems usually follow from them.
      problems.sort(key=lambda p: not p.startswith("params/"))
      raise mismatch(f"checkpoint {self.directory}/{step} does not match the config", problems)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def mismatch(what: str, problems: list[str]) -> CheckpointMismatchError:
  """One line: `what`, the first three problems and how many more there are."""
  more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
  return CheckpointMismatchError(f"{what}: " + "; ".join(problems[:3]) + more)


def abstract(tree: Any, shardings: Any):
  """ShapeDtypeStructs carrying `shardings`, as a restore target."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
