"""Files of a workdir, checkpoint, cache or results directory, on any filesystem.

Every path a run writes or reads goes through `etils.epath`, as TFDS's and Orbax's do, so a
`gs://` (or `s3://`) workdir works wherever a local one does. Two things differ on object
stores, and these helpers hide both:

- No rename: a local file is written beside its name and renamed over it (a reader sees the
  old file or the new one, whole); an object store makes an upload visible whole on its own.
- No append: `LineLog` appends to a local file and rewrites the whole object elsewhere.
"""

import io
import json
import os
import socket
import time
from typing import Any

from etils import epath
import numpy as np


def path(p) -> epath.Path:
  return p if isinstance(p, epath.Path) else epath.Path(os.fspath(p))


def is_local(p) -> bool:
  return "://" not in os.fspath(p)


def join(p, *names) -> str:
  """`os.path.join` for local paths and URLs alike (a string, as configs and logs hold)."""
  return os.fspath(path(p).joinpath(*names))


def size(p) -> int:
  """Bytes in file `p` (locally os's answer: epath's stat also looks up the owner's name,
  which fails for a uid the host does not know, as in containers)."""
  return os.path.getsize(p) if is_local(p) else path(p).stat().length


def mtime(p) -> float:
  """When file `p` was last modified (seconds since the epoch; see `size`)."""
  return os.path.getmtime(p) if is_local(p) else path(p).stat().mtime


def write_atomic(p, data: str | bytes) -> None:
  """Writes `data` so that a reader never sees part of it (see the module docstring)."""
  p = path(p)
  mode = "wb" if isinstance(data, bytes) else "w"
  if not is_local(p):
    with p.open(mode) as f:
      f.write(data)
    return
  # Named for its writer: processes writing the same file at once never share a half file.
  tmp = p.with_name(f"{p.name}.tmp.{socket.gethostname()}.{os.getpid()}")
  with open(tmp, mode, encoding=None if isinstance(data, bytes) else "utf-8") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())  # On disk before it takes its name: a host crash leaves no stub.
  tmp.replace(p)


def read_json(p) -> Any:
  """The JSON in file `p` (FileNotFoundError when there is none)."""
  with path(p).open("r") as f:
    return json.load(f)


def write_json(p, value, indent: int | None = 1, **kwargs) -> None:
  write_atomic(p, json.dumps(value, indent=indent, **kwargs))


def save_arrays(p, **arrays) -> None:
  """An .npz of `arrays`, written atomically."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  write_atomic(p, buffer.getvalue())


def load_arrays(p) -> dict[str, np.ndarray]:
  """The arrays of an .npz written by `save_arrays` (or np.savez)."""
  with path(p).open("rb") as f, np.load(f) as saved:
    return {k: saved[k] for k in saved.files}


def save_array(p, array: np.ndarray) -> None:
  """An .npy, written atomically."""
  buffer = io.BytesIO()
  np.save(buffer, array)
  write_atomic(p, buffer.getvalue())


def load_array(p) -> np.ndarray:
  """An .npy: memory-mapped where the file is local (read when used), else read whole."""
  if is_local(p):
    return np.load(os.fspath(p), mmap_mode="r")
  with path(p).open("rb") as f:
    return np.load(f)


class LineLog:
  """A text file that grows a line at a time (metrics.jsonl): appended to where the
  filesystem can append; where it cannot (object stores), rewritten whole at a flush at most
  every `remote_flush_seconds` (an object takes about one update a second) and at close."""

  def __init__(self, p, remote_flush_seconds: float = 30.0):
    self.path = path(p)
    self._local = is_local(self.path)
    self._every, self._flushed = remote_flush_seconds, -float("inf")
    if self._local:
      self._file = self.path.open("a", encoding="utf-8")
    else:
      self._lines = self.path.read_text().splitlines(True) if self.path.exists() else []

  def write(self, line: str) -> None:
    if self._local:
      self._file.write(line)
    else:
      self._lines.append(line)

  def flush(self, force: bool = False) -> None:
    if self._local:
      self._file.flush()
    elif force or time.monotonic() - self._flushed >= self._every:
      self.path.write_text("".join(self._lines))
      self._flushed = time.monotonic()

  def lines(self) -> list[str]:
    """What the file holds now, with every line written so far."""
    self.flush(force=True)
    return self.path.read_text().splitlines(True) if self.path.exists() else []

  def replace_lines(self, lines: list[str]) -> None:
    """The file's content becomes `lines`, atomically (see the module docstring)."""
    if self._local:
      self._file.close()
      write_atomic(self.path, "".join(lines))
      self._file = self.path.open("a", encoding="utf-8")
    else:
      self._lines = list(lines)
      self.flush(force=True)

  def close(self) -> None:
    self.flush(force=True)
    if self._local:
      self._file.close()
