"""Errors that mean "the input is wrong", which the launcher reports as one line."""

from agriclip_jax.checkpointing import CheckpointMismatchError, CheckpointWriteError
from agriclip_jax.config_lib import ConfigError
from agriclip_jax.input.datasets import DatasetError
from agriclip_jax.input.preprocess import CorruptImageError
from agriclip_jax.trainers.loop import NonFiniteError, Preempted
from agriclip_jax.workdir_lock import WorkdirError, WorkdirInUseError
from data.builder_utils import InputError

__all__ = ["ConfigError", "Preempted", "USER_ERRORS"]

USER_ERRORS = (CheckpointMismatchError, CheckpointWriteError, ConfigError, CorruptImageError,
               DatasetError, InputError, NonFiniteError, FileNotFoundError, WorkdirError,
               WorkdirInUseError)

