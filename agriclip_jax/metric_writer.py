"""Metric writing: CLU writers (TensorBoard events + log lines) and a metrics.jsonl, process 0.

Other processes get a writer that drops everything, so a multi-host run logs once.
"""

import json
import math
from typing import Any, Mapping

from clu import metric_writers
import jax
import numpy as np

from agriclip_jax import files


def _scalar(value) -> float:
  return float(np.asarray(value))


def _step(line: str) -> float:
  """A record's step; a record cut short by a killed run counts as past every step."""
  try:
    return json.loads(line)["step"]
  except (ValueError, KeyError):
    return math.inf


class Writer:

  def __init__(self, workdir: str):
    self.is_main = jax.process_index() == 0
    if self.is_main:
      files.path(workdir).mkdir(parents=True, exist_ok=True)
      self.clu = metric_writers.create_default_writer(workdir, asynchronous=True)
      self._jsonl = files.LineLog(files.path(workdir) / "metrics.jsonl")
    else:
      self.clu = metric_writers.MultiWriter([])
      self._jsonl = None

  def write(self, step: int, scalars: Mapping[str, Any]) -> dict[str, float]:
    scalars = {k: _scalar(v) for k, v in scalars.items()}
    self.clu.write_scalars(step, scalars)
    if self._jsonl:
      self._jsonl.write(json.dumps({"step": step, **{
          k: (v if math.isfinite(v) else str(v)) for k, v in scalars.items()}}) + "\n")
      self._jsonl.flush()
    return scalars

  def drop_after(self, step: int) -> None:
    """Removes metrics.jsonl's records past `step` (a resumed run's restored step): they
    belong to steps the run lost and now trains again, which would otherwise be listed twice.
    The file is rewritten atomically, so a crash leaves the old or the new one whole."""
    if not self._jsonl:
      return
    lines = [line for line in self._jsonl.lines() if line.strip()]
    kept = [line for line in lines if _step(line) <= step]
    if len(kept) < len(lines):
      self._jsonl.replace_lines(kept)

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """[batch, height, width, 3] uint8 images (TensorBoard)."""
    self.clu.write_images(step, images)

  def hparams(self, flat_config: Mapping[str, Any]) -> None:
    self.clu.write_hparams({k: v if isinstance(v, (int, float, str, bool)) else str(v)
                            for k, v in flat_config.items()})

  def flush(self) -> None:
    self.clu.flush()

  def close(self) -> None:
    self.clu.close()
    if self._jsonl:
      self._jsonl.close()


def read_jsonl(workdir: str) -> list[dict[str, Any]]:
  """All records a run's Writer has written (tests and summaries read this)."""
  path = files.path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
