"""One run per workdir: an exclusive `flock` on WORKDIR/.lock, held while the run lasts.

Two runs on one workdir would write the same checkpoints (Orbax fails deep inside asyncio)
and interleave their metrics, so the second is refused in one line naming the holder (host,
pid, start time), which the lock file holds as JSON. The OS drops a `flock` when its process
dies, so a crashed or killed run leaves no stale lock, only stale text that the next holder
overwrites.

Multi-process runs (jax.distributed) share the workdir, often on a shared filesystem, and
their processes would exclude each other on one file. So process i locks its own file
(`.lock` for process 0, `.lock.<i>` for the others): two runs still collide, since each has
a process 0, and all processes agree (one allgather) so that a refused run stops everywhere,
not only where its lock failed.

Before locking, `create` makes the workdir and writes a probe file in it, so that a workdir
path that is a file, or is unwritable or on a read-only mount, stops the run in one line
naming the path and the cause, not in a traceback from the lock, Orbax or the metric writer.

Object stores (a `gs://` workdir) have no locks: there the run goes on unlocked, saying so.
"""

import contextlib
import errno
import fcntl
import json
import os
import socket
import tempfile
import time

from absl import logging
import jax
import numpy as np

from agriclip_jax import errors
from agriclip_jax import files


class WorkdirInUseError(errors.UserError, RuntimeError):
  """Another run holds the workdir's lock."""


class WorkdirError(errors.UserError, RuntimeError):
  """The workdir cannot be created or written."""


def create(workdir: str) -> None:
  """Creates `workdir` and checks this process can write files in it, or raises WorkdirError."""
  if not files.is_local(workdir):
    try:
      files.path(workdir).mkdir(parents=True, exist_ok=True)
      probe = files.path(workdir) / f".write_probe.{socket.gethostname()}.{os.getpid()}"
      probe.write_text("")
      probe.unlink()
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise WorkdirError(f"cannot write to workdir {workdir}: {e}") from None
    return
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_probe."):
      pass
  except OSError as e:
    existing = workdir
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
      existing = os.path.dirname(existing)
    if existing == workdir and not os.path.isdir(workdir):
      raise WorkdirError(f"workdir {workdir} is a file, not a directory") from None
    if not os.path.isdir(existing):
      raise WorkdirError(f"cannot create workdir {workdir}: {existing} is a file, not a "
                         "directory") from None
    raise WorkdirError(f"cannot write to workdir {workdir}: {e.strerror or e}") from None


def lock_path(workdir: str, process_index: int) -> str:
  return os.path.join(workdir, ".lock" if process_index == 0 else f".lock.{process_index}")


def _holder(file) -> str:
  """The holder's host, pid and start time as its lock file states them."""
  file.seek(0)
  try:
    holder = json.loads(file.read())
    return f"pid {holder['pid']} on {holder['host']}, started {holder['start']}"
  except (ValueError, KeyError, TypeError):  # The holder is between its flock and its write.
    return "a run that is starting"


def _try_lock(path: str):
  """(the open, locked file, None), or (None, why not)."""
  file = open(path, "a+")  # Not "w": truncating would erase the holder's details.
  try:
    fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    if e.errno not in (errno.EAGAIN, errno.EACCES):
      # A filesystem without locks (ENOLCK): running unlocked beats not running at all.
      logging.warning("cannot lock %s (%s); running without a workdir lock", path, e)
      return file, None
    why = _holder(file)
    file.close()
    return None, why
  file.seek(0)
  file.truncate()
  file.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                         "start": time.strftime("%Y-%m-%d %H:%M:%S %Z")}))
  file.flush()
  return file, None


@contextlib.contextmanager
def hold(workdir: str):
  """Holds the workdir's lock for this process, or raises WorkdirInUseError."""
  if not files.is_local(workdir):
    logging.warning("%s is not on a local filesystem, which has no locks: running without "
                    "a workdir lock (make sure no other run uses it)", workdir)
    yield
    return
  path = lock_path(workdir, jax.process_index())
  file, holder = _try_lock(path)
  refused = file is None
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    refused_anywhere = bool(np.any(multihost_utils.process_allgather(np.int32(refused))))
    if refused_anywhere and not refused:
      file.close()
      raise WorkdirInUseError(f"{workdir} is in use by another run (another process of this "
                              "run could not lock it)")
  if refused:
    raise WorkdirInUseError(f"{workdir} is in use by another run ({holder}; lock {path}); "
                            "wait for it to end or use another --workdir")
  try:
    yield
  finally:
    file.close()  # Closing releases the flock.
