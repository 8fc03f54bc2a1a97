"""Metric writing: CLU writers (TensorBoard events + log lines) and a metrics.jsonl, process 0.

Other processes get a writer that drops everything, so a multi-host run logs once.
"""

import json
import math
import os
from typing import Any, Mapping

from clu import metric_writers
import jax
import numpy as np


def _scalar(value) -> float:
  return float(np.asarray(value))


class Writer:

  def __init__(self, workdir: str):
    self.is_main = jax.process_index() == 0
    if self.is_main:
      os.makedirs(workdir, exist_ok=True)
      self.clu = metric_writers.create_default_writer(workdir, asynchronous=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
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
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
