"""Trainers, chosen by `config.trainer`. Each module has `default_config()`, `OPEN_FIELDS`
and `train(config, workdir) -> summary`."""

import importlib

from agriclip_jax import config_lib
from agriclip_jax import workdir_lock

TRAINERS = {
    "contrastive": "agriclip_jax.trainers.contrastive",
    "supervised": "agriclip_jax.trainers.supervised",
    "dino": "agriclip_jax.trainers.dino",
    "align": "agriclip_jax.trainers.align",
    "ssl_contrastive": "agriclip_jax.trainers.ssl_contrastive",
    "eval": "agriclip_jax.trainers.eval",
}


def get(name: str):
  if name not in TRAINERS:
    raise config_lib.ConfigError(f"unknown trainer {name!r}; expected one of {sorted(TRAINERS)}")
  return importlib.import_module(TRAINERS[name])


def validate(config) -> None:
  """Every field known to the trainer, every evaluator field known to its evaluator."""
  from agriclip_jax.evaluators import base as evaluators  # pylint: disable=g-import-not-at-top
  if "trainer" not in config:
    raise config_lib.ConfigError("config has no 'trainer' field")
  trainer = get(config.trainer)
  config_lib.validate(config, trainer.default_config(), trainer.OPEN_FIELDS)
  evaluators.validate(config.get("evals", {}))


def run(config, workdir: str):
  """Validates `config` and trains it in `workdir`, holding the workdir's lock (one run per
  workdir); returns the run's summary."""
  validate(config)
  workdir = config_lib.absolute(workdir)
  workdir_lock.create(workdir)
  with workdir_lock.hold(workdir):
    return get(config.trainer).train(config, workdir)
