"""The base of errors that mean "the input is wrong", which the commands report as one line.

Each layer defines its own error types where it raises them (`config_lib.ConfigError`,
`input.datasets.DatasetError`, `checkpointing.CheckpointMismatchError`, ...) as subclasses of
`UserError`, so this module, at the bottom of the import graph, imports none of them.
Builders' input errors (`data.builder_utils.InputError`, outside the package) become
`DatasetError` where the package runs a build.
"""


class UserError(Exception):
  """A wrong config, dataset, checkpoint, file or workdir: reported in one line, no trace."""


USER_ERRORS = (UserError, FileNotFoundError)
