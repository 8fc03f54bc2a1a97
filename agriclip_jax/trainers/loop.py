"""The training loop shared by trainers: steps, logging, evaluation, checkpoints, stopping.

- Resumes from the latest checkpoint in `workdir/checkpoints` (state + data iterator) that
  passes verification (newer ones that fail it are moved aside, see `checkpointing`), else
  initialises (then copies `config.init` parameters, if any). metrics.jsonl loses its records
  past the step it starts from: those steps are trained again.
- Checks every step's loss and gradient norm for non-finite values once the device has
  computed them, up to MAX_UNCHECKED steps behind, so the device queue stays full; a
  non-finite value stops the run naming the step, and no checkpoint is ever written after it.
  The loss and gradient are those before the step's update, so the state itself is also
  checked before each save: an update that overflows the parameters would otherwise be saved,
  and every re-run would resume into NaN.
- SIGTERM (single process) or JAX's preemption sync point (multi-process) saves a checkpoint
  and stops with `Preempted`.
- Counts the training examples whose image failed to decode (the input pipeline replaced each
  with the next decodable one, and named it in a warning): `input/undecodable` per log
  interval, the total kept with the data iterator's state; more than `input.max_undecodable`
  plus `input.max_undecodable_rate` of the examples read stops the run.
- At the last step it evaluates, checkpoints and writes `summary.json`; a run whose summary is
  already at the last step ends at once (`finished_summary`).
"""

import dataclasses
import functools
import signal
import time
from typing import Any, Callable, Iterator

from absl import logging
from clu import periodic_actions
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np

from agriclip_jax import checkpointing
from agriclip_jax import config_lib
from agriclip_jax import errors
from agriclip_jax import files
from agriclip_jax import metric_writer
from agriclip_jax import optim
from agriclip_jax import sharding
from agriclip_jax.input import datasets
from agriclip_jax.pytree import path_str
from agriclip_jax.trainers import state as state_lib

SUMMARY = "summary.json"
# Steps the device may run ahead of the host's check of their loss and gradient norm.
MAX_UNCHECKED = 4
FINITE_KEYS = ("loss", "grad_norm")


class NonFiniteError(errors.UserError, RuntimeError):
  """The loss or gradient norm became NaN or infinite."""


class Preempted(RuntimeError):
  """SIGTERM: a checkpoint was saved and the run stopped; running it again resumes."""


def finished_summary(workdir: str, total_steps: int) -> dict[str, Any] | None:
  """The summary of a run in `workdir` that already reached `total_steps`, else None."""
  path = files.path(workdir) / SUMMARY
  if not path.exists():
    return None
  summary = files.read_json(path)
  checkpoints = files.join(workdir, "checkpoints")
  if summary.get("step") == total_steps and state_lib.latest_step(checkpoints) == total_steps:
    return summary
  return None


def write_summary(workdir: str, summary: dict[str, Any]) -> None:
  """summary.json, written atomically (a reader never sees half of it)."""
  files.write_json(files.path(workdir) / SUMMARY, summary)


def _is_float(leaf) -> bool:
  return jax.numpy.issubdtype(leaf.dtype, jax.numpy.inexact)


@jax.jit
def _all_finite(state) -> tuple[jax.Array, ...]:
  """Whether each float array of `state` is all finite, computed on device; scalars, so each
  is replicated and readable on every process."""
  return tuple(jax.numpy.isfinite(leaf).all() for leaf in jax.tree.leaves(state)
               if _is_float(leaf))


class _StopSignal:
  """Whether to stop for preemption at a step (all processes agree on the step)."""

  def __init__(self):
    self.multi_process = jax.process_count() > 1
    self.received = False
    self._previous = None
    if not self.multi_process:  # Multi-process: JAX's preemption service handles SIGTERM.
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint after this step.")
    self.received = True

  def reached(self, step: int) -> bool:
    if self.multi_process:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.received

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass
class Loop:
  config: Any
  workdir: str
  spec: state_lib.StateSpec
  train_step: Callable  # (state, global batch) -> (state, metrics)
  train_iter: Iterator[dict[str, np.ndarray]]
  batch_sharding: jax.sharding.NamedSharding
  evaluators: list  # [(name, every, evaluator)]
  writer: metric_writer.Writer
  # Called with the restored or initialised state before the first step (and before the
  # first batch is read): e.g. building the LiT image cache from the locked tower.
  before_training: Callable[[Any], None] | None = None

  def __post_init__(self):
    self._undecodable = []  # Each step's count of undecodable examples (device), unread.
    self._undecodable_since_log = None  # None: the batches do not count them.
    self._global_sum = jax.jit(jnp.sum)

  def _restore_or_init(self, checkpoints: checkpointing.Checkpoints):
    latest = checkpoints.restorable_step()
    if latest is not None:
      logging.info("Resuming from %s/%d", checkpoints.directory, latest)
      return checkpoints.restore(latest, self.spec.abstract, self.train_iter)
    state, loaded = self.spec.init(), set()
    if self.config.init.get("workdir"):
      state, loaded = state_lib.load_params(self.config.init, state, self.spec, self.workdir)
    state, imported = state_lib.load_pretrained(self.config.init, state, self.spec,
                                                self.config.get("model"))
    loaded |= imported
    if loaded and self.spec.refresh is not None:
      state = self.spec.refresh(state)
    frozen = [k for k, label in self.spec.labels.items()
              if label == optim.FROZEN and k not in loaded]
    if frozen:
      raise config_lib.ConfigError(
          f"{len(frozen)} frozen parameters (e.g. {frozen[0]}) would keep their random "
          "initial values: load them with config.init (workdir, model, img, txt) or unfreeze them "
          "in config.optim.rules")
    return state

  def evaluate(self, state, step: int, due: Callable[[int], bool]) -> dict[str, float]:
    results = {}
    for name, every, evaluator in self.evaluators:
      if due(every):
        start = time.time()
        for key, value in evaluator.run(state[self.spec.eval_key]).items():
          results[f"{name}/{key}"] = value
        results[f"{name}/seconds"] = time.time() - start
    return self.writer.write(step, results) if results else results

  def run(self) -> dict[str, Any]:
    config, total = self.config, self.config.total_steps
    checkpoints = checkpointing.Checkpoints(
        files.join(self.workdir, "checkpoints"), config.keep_checkpoints)
    state = self._restore_or_init(checkpoints)
    step = int(state["step"])
    self.writer.drop_after(step)
    progress = periodic_actions.ReportProgress(
        num_train_steps=total, writer=self.writer.clu, every_secs=None if config.log_every
        else 60.0, every_steps=config.log_every or None)
    stop = _StopSignal()
    unchecked, since_log, last_eval = [], [], {}
    try:
      if self.before_training is not None and step < total:
        self.before_training(state)
      while step < total:
        if stop.reached(step):
          unchecked = self._check(unchecked)
          if checkpoints.latest_step() != step:  # It may have just been saved.
            self._save(checkpoints, step, state)
          checkpoints.wait()
          raise Preempted(f"stopped by SIGTERM at step {step}; checkpoint saved in "
                          f"{checkpoints.directory}; run the same command to resume")
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          batch = self._next_batch()
          state, step_metrics = self.train_step(state, batch)
        step += 1
        unchecked.append((step, step_metrics))
        unchecked = self._check_finished(unchecked)
        since_log.append(step_metrics)
        progress(step)
        due = functools.partial(config_lib.every, step, total=total)
        if due(config.log_every):
          unchecked = self._check(unchecked)
          self._log(step, since_log)
          since_log = []
        if any(due(every) for _, every, _ in self.evaluators):
          unchecked = self._check(unchecked)
          last_eval = self.evaluate(state, step, due) or last_eval
        if due(config.checkpoint_every):
          unchecked = self._check(unchecked)
          self._save(checkpoints, step, state)
      checkpoints.wait()
      if not last_eval:  # Resumed at the last step after its evaluation was lost.
        last_eval = self.evaluate(state, step, lambda every: True)
      return self._summarize(step, last_eval)
    finally:
      stop.close()
      checkpoints.close()
      self.writer.flush()

  def _next_batch(self):
    local = next(self.train_iter)
    undecodable = local.pop("undecodable", None)
    if undecodable is not None:  # Summed over all processes' rows: every process agrees.
      self._undecodable.append(self._global_sum(
          sharding.global_batch(undecodable, self.batch_sharding)))
      if self._undecodable_since_log is None:
        self._undecodable_since_log = 0
    return sharding.global_batch(local, self.batch_sharding)

  def _count_undecodable(self, step: int) -> None:
    """Adds the undecodable examples of the steps since the last count to the iterator's total;
    DatasetError when the total passes the configured limit."""
    count = sum(int(n) for n in self._undecodable)
    self._undecodable = []
    if not count:
      return
    self._undecodable_since_log += count
    self.train_iter.undecodable += count
    total, read = self.train_iter.undecodable, self.train_iter.position
    limits = self.config.input
    if total > limits.max_undecodable + limits.max_undecodable_rate * read:
      raise datasets.DatasetError(
          f"{total} of the {read} training examples read by step {step} could not be decoded, "
          f"more than config.input.max_undecodable={limits.max_undecodable} + "
          f"max_undecodable_rate={limits.max_undecodable_rate} of them; stopped (the warnings "
          f"above name them; checkpoints are kept in {self.workdir}/checkpoints, and a run with "
          "higher limits resumes)")

  def _check_finished(self, unchecked: list) -> list:
    """Checks, oldest first, the steps whose metrics the device has finished (without waiting)
    and, waiting for them, those beyond MAX_UNCHECKED: the device keeps up to that many steps
    queued instead of one. Returns the steps left unchecked; before anything is logged,
    evaluated or saved every step is checked, so nothing is written after a non-finite step."""
    while unchecked and (len(unchecked) > MAX_UNCHECKED or all(
        unchecked[0][1][key].is_ready() for key in FINITE_KEYS)):
      self._check(unchecked[:1])
      unchecked = unchecked[1:]
    return unchecked

  def _check(self, unchecked) -> list:
    """Checks every step of `unchecked` (waiting for the device); returns what is left: none."""
    for step, step_metrics in unchecked:
      for key in FINITE_KEYS:
        value = float(step_metrics[key])
        if not np.isfinite(value):
          raise NonFiniteError(
              f"{key} is {value} at step {step}; stopped. Checkpoints before this step are "
              f"kept in {self.workdir}/checkpoints")
    return []

  def _save(self, checkpoints: checkpointing.Checkpoints, step: int, state) -> None:
    """Saves `state` unless a float in it is NaN or infinite (then NonFiniteError)."""
    finite = jax.device_get(_all_finite(state))
    if not all(finite):
      paths = [path_str(p) for p, leaf in jax.tree_util.tree_leaves_with_path(state)
               if _is_float(leaf)]
      bad = [p for p, ok in zip(paths, finite) if not ok]
      more = f" and {len(bad) - 1} more arrays" if len(bad) > 1 else ""
      raise NonFiniteError(
          f"the state to save at step {step} holds NaN or infinite values ({bad[0]}{more}); "
          f"not saved, stopped. Checkpoints before this step are kept in "
          f"{self.workdir}/checkpoints")
    self._count_undecodable(step)  # The iterator's state holds the total.
    checkpoints.save(step, state, self.train_iter)

  def _log(self, step: int, since_log) -> None:
    """Writes the mean of each metric over the steps since the last log line, and the count of
    undecodable examples in them."""
    self._count_undecodable(step)
    metrics = {k: np.mean([float(m[k]) for m in since_log]) for k in since_log[-1]}
    if self._undecodable_since_log is not None:
      metrics["input/undecodable"] = self._undecodable_since_log
      self._undecodable_since_log = 0
    self.writer.write(step, metrics)

  def _summarize(self, step: int, results: dict[str, float]) -> dict[str, Any]:
    summary = {"step": step, **{k: float(v) for k, v in results.items()}}
    if jax.process_index() == 0:
      write_summary(self.workdir, summary)
    return summary
