"""Command-line wrapper: failures caused by the input or the machine print one line instead of a traceback.

The project's own errors (:mod:`mimsparse.errors`) are raised where bad input is detected and carry a
message that names the problem and the fix; an ``OSError`` escaping a tool (a file that cannot be
written or read) is reported with its path. Any other exception is a bug and keeps its traceback."""
from __future__ import annotations

import argparse
import os
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


def share_cores_between_processes() -> None:
    """Under torchrun, each process gets its share of the cores (cpu_count // WORLD_SIZE threads) unless
    OMP_NUM_THREADS says otherwise: torch's default, every core per process, oversubscribes them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))


def _error_line(message: str) -> None:
    """``error: message`` and its newline in one write: the ranks of a torchrun job share a stderr, and
    print's two writes could interleave their lines."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def interactive() -> bool:
    """Output goes to a terminal (stdout for the lines, stderr for a progress bar): a bar that redraws in
    place is readable there; in a log file (``> log``, ``nohup``, a cluster job, CI) each redraw would
    stay, so tools print plain lines instead."""
    return sys.stdout.isatty() and sys.stderr.isatty()


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
        options = [a for a in bad if a.startswith("-")]
        near = nearest_option(parser, options[0]) if options else None
        hint = f"; did you mean {near}?" if near else " (config overrides look like section.key=value)"
        parser.error(f"unrecognized arguments: {' '.join(bad)}{hint}")
    args.overrides = overrides
    return args


def nearest_option(parser: argparse.ArgumentParser, option: str) -> str | None:
    """The option or config key ``option`` most resembles (``--mask_ratio`` -> ``--mask-ratio``,
    ``--base-lr`` -> ``optim.base_lr=VALUE``), or None."""
    import difflib

    from mimsparse.config import PretrainConfig

    candidates = {s: s for a in parser._actions for s in a.option_strings if a.help != argparse.SUPPRESS}
    for section, values in PretrainConfig().to_dict().items():
        for name in values:
            for spelling in (f"--{name}", f"--{section}.{name}", f"--{section}-{name}"):
                candidates.setdefault(spelling.replace("_", "-"), f"{section}.{name}=VALUE")
    name = option.split("=", 1)[0].replace("_", "-")
    if name in candidates and candidates[name] != name:
        return candidates[name]
    near = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.7)
    return candidates[near[0]] if near else None
