"""Command-line wrapper: failures caused by the input or the machine print one line instead of a traceback.

The project's own errors (:mod:`mimsparse.errors`) are raised where bad input is detected and carry a
message that names the problem and the fix; an ``OSError`` escaping a tool (a file that cannot be
written or read) is reported with its path. Any other exception is a bug and keeps its traceback."""
from __future__ import annotations

import argparse
import sys

from mimsparse.errors import MimsparseError


def run_cli(main) -> int:
    try:
        return main()
    except MimsparseError as e:
        _error_line(one_line(e))
        return 2
    except OSError as e:  # the project's code names its own files (OutputError); this is the rest
        where = f"{str(e.filename)!r}: " if e.filename else ""
        _error_line(f"{where}{one_line(e.strerror or e)}")
        return 2


def _error_line(message: str) -> None:
    """``error: message`` and its newline in one write: the ranks of a torchrun job share a stderr, and
    print's two writes could interleave their lines."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line (library messages quoted inside ours may span several)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text


def parse_with_overrides(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse ``argv`` where ``section.key=value`` config overrides may stand anywhere among the options
    (before, between or after them); they land, in the order given, in ``args.overrides``. Anything
    else argparse does not know is refused as usual."""
    args, rest = parser.parse_known_args(argv)
    overrides = list(getattr(args, "overrides", None) or []) + rest
    bad = [a for a in overrides if a.startswith("-") or "=" not in a]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (config overrides look like section.key=value)")
    args.overrides = overrides
    return args
