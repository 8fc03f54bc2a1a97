"""Runs a config: `python launch.py --config configs/alive_lit.py:demo --workdir DIR` (or
`agriclip-launch ...` where the package is installed, from any directory).

Overrides: `--config.total_steps=100 --config.input.batch_size=64`. Several processes:
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` on each, or srun under SLURM.
The launcher only parses flags and sets up JAX; `config.trainer` names the trainer.
"""

import os
import re
import sys

# TensorFlow (used by TFDS and CLU for files and summaries, never for compute) stays quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
from absl import logging
from ml_collections import config_flags

from agriclip_jax import config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

_FLAGS = {}  # name -> FlagHolder, defined when the command runs (see `run`).


def define_flags() -> None:
  # List fields (mesh, sharding_rules) are overridable as Python literals, like any other field.
  config_flags.register_flag_parser_for_type(list, config_lib.ListParser())
  _FLAGS["config"] = config_flags.DEFINE_config_file(
      "config", None, "Config file and its argument: configs/x.py[:arg].", lock_config=True)
  _FLAGS["workdir"] = flags.DEFINE_string(
      "workdir", None, "Where checkpoints, metrics and results go (default: workdirs/<config>).")
  _FLAGS["coordinator"] = flags.DEFINE_string("coordinator_address", None,
                                              "host:port of process 0, for multi-process runs.")
  _FLAGS["num_processes"] = flags.DEFINE_integer("num_processes", None, "Number of processes.")
  _FLAGS["process_id"] = flags.DEFINE_integer("process_id", None, "This process's index.")
  flags.mark_flag_as_required("config")


def default_workdir(config_arg: str) -> str:
  path, _, arg = config_arg.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("workdirs", name + ("_" + re.sub(r"[^\w.-]+", "_", arg) if arg else ""))


def parse_flags(argv):
  """absl flag parsing, but a bad --config.<field> is one line naming the field."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError, OSError) as e:
    message = str(e).strip().splitlines()[-1]
    args = iter(argv[1:])
    config_spec, overrides = None, []
    for arg in args:
      name, has_value, value = arg.lstrip("-").partition("=")
      if name == "config":
        config_spec = value if has_value else next(args, None)
      elif name.startswith("config."):
        overrides.append(name[len("config."):])
    try:
      if config_spec:
        config = config_lib.load(config_spec)
        for field in overrides:
          config_lib.check_field(config, field)
    except config_lib.ConfigError as known:
      message = str(known)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Imported here so that flag errors show before the heavy imports.
  from agriclip_jax import distributed  # pylint: disable=g-import-not-at-top
  from agriclip_jax import errors  # pylint: disable=g-import-not-at-top
  from agriclip_jax import trainers  # pylint: disable=g-import-not-at-top
  from agriclip_jax.trainers import common  # pylint: disable=g-import-not-at-top
  from agriclip_jax.trainers import loop  # pylint: disable=g-import-not-at-top

  config_spec = flags.FLAGS["config"].config_filename
  config_path = config_spec.partition(":")[0]
  if not os.path.exists(config_path):
    print(f"error: config file {config_path} does not exist", file=sys.stderr)
    return 2
  logging.set_verbosity(logging.INFO)
  distributed.quiet_library_logs()
  workdir = _FLAGS["workdir"].value or default_workdir(config_spec)
  try:
    distributed.initialize(_FLAGS["coordinator"].value, _FLAGS["num_processes"].value,
                           _FLAGS["process_id"].value)
    distributed.hide_accelerators_from_tensorflow()
    summary = trainers.run(_FLAGS["config"].value, workdir)
  except errors.USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except loop.Preempted as e:
    print(f"preempted: {e}", file=sys.stderr)
    return 143
  for line in common.describe(summary):
    print(line)
  return 0


def run(argv=None) -> None:
  """The command: flags from `argv` (default sys.argv); `--config configs/...` is found in
  the working directory, else beside the installed package (so it runs from anywhere)."""
  argv = list(sys.argv if argv is None else argv)
  define_flags()
  app.run(lambda args: sys.exit(main(args)), argv=config_lib.locate_config_arg(argv),
          flags_parser=parse_flags)


if __name__ == "__main__":
  run()
