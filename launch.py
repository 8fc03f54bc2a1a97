"""Runs a config: `python launch.py --config configs/alive_lit.py:demo --workdir DIR`.

Overrides: `--config.total_steps=100 --config.input.batch_size=64`. Several processes:
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` on each, or srun under SLURM.
The launcher only parses flags and sets up JAX; `config.trainer` names the trainer.
"""

import os
import re
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF (used by TFDS and CLU) is quiet.

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and its argument: configs/x.py[:arg].", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints, metrics and results go (default: workdirs/<config>).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def default_workdir(config_arg: str) -> str:
  path, _, arg = config_arg.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("workdirs", name + ("_" + re.sub(r"[^\w.-]+", "_", arg) if arg else ""))


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Imported here so that flag errors show before the heavy imports.
  from agriclip_jax import distributed  # pylint: disable=g-import-not-at-top
  from agriclip_jax import errors  # pylint: disable=g-import-not-at-top
  from agriclip_jax import trainers  # pylint: disable=g-import-not-at-top
  from agriclip_jax.trainers import common  # pylint: disable=g-import-not-at-top

  logging.set_verbosity(logging.INFO)
  distributed.quiet_library_logs()
  workdir = _WORKDIR.value or default_workdir(flags.FLAGS["config"].config_filename)
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    distributed.hide_accelerators_from_tensorflow()
    summary = trainers.run(_CONFIG.value, workdir)
  except errors.USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except errors.Preempted as e:
    print(f"preempted: {e}", file=sys.stderr)
    return 143
  for line in common.describe(summary):
    print(line)
  return 0


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(lambda argv: sys.exit(main(argv)))
