"""The project's error types: failures caused by what the user gave (a config, data, a checkpoint, an
output folder, the machine), each reported by :func:`mimsparse.cli.run_cli` as one line. Anything else
is a bug and keeps its traceback, so code raises these at the place it detects bad input.

Each also derives from the built-in type callers caught before these existed (``ValueError`` for bad
values, ``RuntimeError`` for failed runs, ``OSError`` for output that cannot be written)."""
from __future__ import annotations


class MimsparseError(Exception):
    """Base of every user-facing error: run_cli prints ``error: <message>`` and exits with 2."""


class ConfigError(MimsparseError, ValueError):
    """A config key, command-line option or argument has a value that cannot work (named in the message)."""


class DataError(MimsparseError, ValueError):
    """The data folder or dataset cannot train: missing, empty, or no readable image."""


class UnreadableImage(DataError):
    """One image file cannot be decoded; the data loader skips it and counts it."""


class CheckpointError(MimsparseError, RuntimeError):
    """A checkpoint cannot be read, is corrupt, belongs to another model or run."""


class ConversionError(MimsparseError, ValueError):
    """A state dict does not fit the layout it is converted to or from."""


class TrainingError(MimsparseError, RuntimeError):
    """Training had to stop (non-finite loss or weights, wrong precision/device); the message says what was kept."""


class DistributedError(MimsparseError, RuntimeError):
    """The torchrun environment does not fit the request (GPUs, ranks)."""


class BackendUnavailable(MimsparseError, RuntimeError):
    """An unknown backend name or a backend whose library is not installed."""


class UnsupportedDtype(MimsparseError, TypeError):
    """A backend cannot compute in the requested precision."""


class OutputError(MimsparseError, OSError):
    """An output file or folder cannot be written (full disk, permissions, a folder in the way); the
    message names the path and what was kept."""
