"""Command-line wrapper: expected failures (bad input) print one clear line instead of a traceback."""
from __future__ import annotations

import sys

from mimsparse.backends import BackendUnavailable
from mimsparse.train.checkpoint import CheckpointError
from mimsparse.config import ConfigError
from mimsparse.errors import ConversionError
from mimsparse.train.data import DataError
from mimsparse.train.distributed import DistributedError

USER_ERRORS = (BackendUnavailable, CheckpointError, ConfigError, ConversionError, DataError, DistributedError,
               ValueError, TypeError)


def run_cli(main) -> int:
    from mimsparse.train.engine import TrainingError

    try:
        return main()
    except (*USER_ERRORS, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
