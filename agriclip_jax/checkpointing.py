"""Orbax checkpoints holding the train state and the data iterator together.

Each checkpoint is a step directory with two items: `state` (params, optimizer state, step,
RNG; saved asynchronously, each process writing its shards) and `data` (the grain iterator's
state, one file per process), so a resumed run continues with exactly the batch an
uninterrupted run would have seen next. The training iterator's state is its global stream
position (see `input/pipeline.py`), so a run may resume on another number of processes.

Once a save is complete, process 0 writes `verified.json` into its step directory last
(atomically): each file's size and CRC32. A restore first checks the newest checkpoint
against it, so a truncated, deleted or overwritten file is found before Orbax reads it (a
deep traceback, or worse, garbage parameters loaded silently); a checkpoint that fails is
renamed `<step>.damaged` and the one before it is tried.

A save that cannot be written (the disk is full, a quota or file-size limit is hit, the
directory became read-only) stops the run with `CheckpointWriteError`: one line naming the
checkpoint, the cause and the newest intact checkpoint left. Before each save every process
checks that its file system has room for its share of the state, so a full disk is found
before Orbax starts writing.
"""

import dataclasses
import json
import os
import re
import shutil
from typing import Any
import zlib

from absl import logging
import grain
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from agriclip_jax import config_lib
from agriclip_jax import errors
from agriclip_jax import files
from agriclip_jax.pytree import path_str


class CheckpointMismatchError(errors.UserError, ValueError):
  """A checkpoint does not fit the model/optimizer the config describes."""


class CheckpointWriteError(errors.UserError, OSError):
  """A checkpoint could not be written (full disk, quota, read-only file system)."""


def write_cause(error: BaseException) -> str | None:
  """The operating system's reason when `error` (Orbax's, or tensorstore's inside it) is a
  failed write; None for any other error."""
  while error is not None:
    if isinstance(error, OSError) and error.errno:
      return os.strerror(error.errno)
    code = re.search(r"os_error_code='?(\d+)", str(error))
    if code:
      return os.strerror(int(code.group(1)))
    error = error.__cause__ or error.__context__
  return None


def _process_bytes(state) -> int:
  """Bytes this process writes for `state`: its addressable shards, one per replica set."""
  total = 0
  for leaf in jax.tree.leaves(state):
    if isinstance(leaf, jax.Array):
      total += sum(shard.data.nbytes for shard in leaf.addressable_shards
                   if shard.replica_id == 0)
    else:
      total += np.asarray(leaf).nbytes
  return total


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


MANIFEST = "verified.json"


def _crc32(path) -> int:
  crc = 0
  with files.path(path).open("rb") as f:
    while chunk := f.read(1 << 24):
      crc = zlib.crc32(chunk, crc)
  return crc


def _files(step_dir: str) -> list[str]:
  """Every file under `step_dir` but the manifest, as sorted paths relative to it."""
  step_dir = files.path(step_dir)
  return sorted(os.fspath((root / name).relative_to(step_dir))
                for root, _, names in step_dir.walk() for name in names
                if not (root == step_dir and name.startswith(MANIFEST)))


def write_manifest(step_dir: str) -> None:
  """`verified.json`: [size, crc32] of each file of a complete checkpoint, written last."""
  listed = {}
  for name in _files(step_dir):
    path = files.path(step_dir) / name
    listed[name] = [files.size(path), _crc32(path)]
  files.write_json(files.path(step_dir) / MANIFEST, {"files": listed}, indent=None)


def damage(step_dir: str, checksums: bool = True) -> str | None:
  """What its manifest says is wrong with the checkpoint in `step_dir`, or None.

  `checksums=False` checks files and sizes only: cheap enough for every look-up of a run's
  latest step (a resuming run checks the checksums of what it restores).

  None too for a checkpoint without a manifest (written by older code, or a run killed
  between the save and its manifest): it is complete by Orbax's commit, only unchecked.
  """
  path = files.path(step_dir) / MANIFEST
  if not path.exists():
    return None
  try:
    listed = files.read_json(path)["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"{MANIFEST} is unreadable ({e})"
  for name, (size, crc) in listed.items():
    file = files.path(step_dir) / name
    if not file.is_file():
      return f"{name} is missing"
    if files.size(file) != size:
      return f"{name} has {files.size(file)} bytes, {size} written"
    if checksums and _crc32(file) != crc:
      return f"{name} differs from what was written (CRC32)"
  return None


def _move_aside(step_dir: str) -> str:
  aside, n = step_dir + ".damaged", 1
  while files.path(aside).exists():  # Damaged again after a later run rewrote this step.
    aside, n = f"{step_dir}.damaged.{n}", n + 1
  files.path(step_dir).rename(aside)
  return aside


class Checkpoints:

  def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = True):
    self.directory = config_lib.absolute(directory)
    self._unverified = []  # Steps saved (maybe still being written) without a manifest yet.
    self._failed = False  # A save failed to write: nothing more is written or waited for.
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
    self.wait()  # Orbax's save would wait for the previous one anyway.
    self._check_space(step, _process_bytes(state))
    self._unverified.append(step)
    try:
      self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise self._write_error(step, e) from None

  def _check_space(self, step: int, needed: int) -> None:
    """CheckpointWriteError, on every process, unless each has room for its part of `step`."""
    if not files.is_local(self.directory):
      return  # Object stores are not filled up by a checkpoint.
    free = shutil.disk_usage(self.directory).free
    short = np.int32(free < needed)
    if jax.process_count() > 1:
      short = np.max(multihost_utils.process_allgather(short))
    if short:
      mine = (f"it needs about {needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free"
              if free < needed else "another process's disk is full")
      raise CheckpointWriteError(
          f"not enough space to write checkpoint {self.directory}/{step} ({mine}); "
          f"{self._intact_left(step)}. Free some space and run again to resume")

  def _intact_left(self, failed: int) -> str:
    steps = [s for s in self.manager.all_steps() if s != failed]
    return (f"the newest intact checkpoint is {self.directory}/{max(steps)}" if steps
            else "no earlier checkpoint exists")

  def _write_error(self, step: int, error: Exception) -> Exception:
    """`error` as a one-line CheckpointWriteError when it is a failed write, else itself."""
    cause = write_cause(error)
    if cause is None:
      return error
    self._failed = True
    return CheckpointWriteError(f"writing checkpoint {self.directory}/{step} failed: {cause}; "
                                f"{self._intact_left(step)}")

  def restorable_step(self) -> int | None:
    """The newest step whose checkpoint passes verification, after moving aside (renaming to
    `<step>.damaged`) the newer ones that fail it, so no later run or loader picks them.

    Process 0 decides and tells the others, so every process restores the same step.
    """
    step = self._newest_intact() if jax.process_index() == 0 else -1
    if jax.process_count() > 1:
      step = int(multihost_utils.broadcast_one_to_all(np.int32(step)))
    self.manager.reload()
    return None if step < 0 else step

  def _newest_intact(self) -> int:
    for step in sorted(self.manager.all_steps(), reverse=True):
      step_dir = files.join(self.directory, str(step))
      problem = damage(step_dir)
      if problem is None:
        if not (files.path(step_dir) / MANIFEST).exists():
          logging.warning("Checkpoint %s has no %s (written by older code, or the run stopped "
                          "before writing it): restoring it unverified", step_dir, MANIFEST)
        return step
      logging.error("Checkpoint %s is damaged (%s): moved aside to %s; trying the one before",
                    step_dir, problem, _move_aside(step_dir))
    return -1

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
    """Waits for the saves in flight, then writes their manifests (process 0)."""
    if self._failed:  # Orbax would raise the same failure again.
      return
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise self._write_error(self._unverified[-1] if self._unverified else -1, e) from None
    for step in self._unverified:
      step_dir = files.join(self.directory, str(step))
      if jax.process_index() == 0 and files.path(step_dir).is_dir():  # Not deleted by max_to_keep.
        write_manifest(step_dir)
    self._unverified = []

  def close(self) -> None:
    self.wait()
    if not self._failed:  # Closing waits on the failed writes and raises again.
      self.manager.close()


def mismatch(what: str, problems: list[str]) -> CheckpointMismatchError:
  """One line: `what`, the first three problems and how many more there are."""
  more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
  return CheckpointMismatchError(f"{what}: " + "; ".join(problems[:3]) + more)


def abstract(tree: Any, shardings: Any):
  """ShapeDtypeStructs carrying `shardings`, as a restore target."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
