"""Multi-process start-up on JAX's own runtime (`jax.distributed`).

A run is multi-process when the launcher is given a coordinator address, or when `srun`
started several tasks of it (JAX then reads SLURM's variables itself). A plain `python
launch.py` inside an sbatch script is one process, whatever the allocation.
"""

import os
import sys

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from agriclip_jax import config_lib
from agriclip_jax import files


def slurm_tasks() -> int:
  """Tasks of the current `srun` job step (only srun sets SLURM_STEP_NUM_TASKS > 1)."""
  return int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) if "SLURM_JOB_ID" in os.environ else 1


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Calls `jax.distributed.initialize` when the environment asks for more than 1 process."""
  if not coordinator_address and slurm_tasks() <= 1:
    return
  # CPU processes exchange collectives over gloo; accelerators ignore this setting.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise config_lib.ConfigError("--coordinator_address needs --num_processes and --process_id")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    jax.distributed.initialize()  # JAX detects SLURM's coordinator, ranks and counts.
  logging.info("Process %d of %d; %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def hide_accelerators_from_tensorflow() -> None:
  """TFDS and CLU import TensorFlow; it must not take GPU memory that JAX needs."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], "GPU")
  except (ImportError, RuntimeError):
    pass


def quiet_library_logs() -> None:
  """INFO lines from this project and CLU (metrics, progress); others from WARNING up, except
  the tracebacks Orbax's background threads log for a failed checkpoint write (the save
  raises that failure again, and `checkpointing` reports it in one line)."""
  import logging as std_logging  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  from agriclip_jax import checkpointing  # pylint: disable=g-import-not-at-top

  def keep(record) -> bool:
    path = record.pathname.replace("\\", "/")
    if record.exc_info and checkpointing.write_cause(record.exc_info[1]):
      return False
    return (record.levelno >= std_logging.WARNING or "/agriclip_jax/" in path
            or "/clu/" in path or path.endswith("launch.py"))

  absl_logging.get_absl_handler().addFilter(keep)
  # When a write fails, tensorstore's other writes still call back into Orbax's event loop,
  # which is closed by then: each prints "Event loop is closed" as an unraisable exception.
  default_hook = sys.unraisablehook

  def unraisable(info) -> None:
    if not (info.exc_type is RuntimeError and str(info.exc_value) == "Event loop is closed"):
      default_hook(info)

  sys.unraisablehook = unraisable


def exists_everywhere(path: str) -> bool:
  """Whether every process sees `path`: a cache all processes use, or none (computing it is
  collective, so processes must agree)."""
  exists = files.path(path).exists()
  if jax.process_count() == 1:
    return exists
  return bool(np.min(multihost_utils.process_allgather(np.int32(exists))))
