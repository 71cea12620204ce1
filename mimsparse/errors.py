"""The project's own error types: what a user can cause and fix (bad config, data, checkpoint...).

Command-line tools print these as one line (``mimsparse.cli.run_cli``); anything else is a bug and
keeps its traceback. Each also derives from the builtin it used to be, so ``except ValueError``
in user code keeps working.
"""
from __future__ import annotations


class MimsparseError(Exception):
    """Base of every error a user's input or environment can cause."""


class ConfigError(MimsparseError, ValueError):
    """A config key or command-line option with a value that cannot work."""


class DataError(MimsparseError, ValueError):
    """A data folder or dataset that cannot be read."""


class CheckpointError(MimsparseError, RuntimeError):
    """A checkpoint that cannot be read, verified or written."""


class ConversionError(MimsparseError, ValueError):
    """Weights that do not fit the model they are converted to or from."""


class TrainingError(MimsparseError, RuntimeError):
    """A run that cannot continue (non-finite loss, no usable batch, unsupported precision...)."""


class DistributedError(MimsparseError, RuntimeError):
    """A torchrun / process-group set-up that cannot work."""
