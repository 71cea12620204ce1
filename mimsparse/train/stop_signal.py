"""Graceful stop: a signal asks a run to stop after the optimizer step in progress.

Clusters warn before they kill a job: SLURM sends SIGUSR1 (``--signal``) or SIGTERM, Kubernetes and
torchrun SIGTERM, a terminal SIGINT. The first such signal only sets a flag; the training loop looks
at it after every optimizer step, all processes of a torchrun job agree on it collectively (one may
have been signalled alone), and the run writes a checkpoint at that step and exits with
:data:`STOP_EXIT_STATUS`, which a requeue script tests. A second signal ends the process at once, by
that signal, as if it had not been caught.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import torch

from mimsparse.errors import ConfigError
from mimsparse.train import distributed

DEFAULT_SIGNALS = "SIGTERM,SIGINT,SIGUSR1"
STOP_EXIT_STATUS = 75  # EX_TEMPFAIL of sysexits.h: "try again later"; a crash is 1, a refused input 2
STOP_NOTES_ENV = "MIMSPARSE_STOP_NOTES"  # set by tools/launch.py: where each process notes its stop


def stopped_with_checkpoint() -> int:
    """The exit status of a process that a signal stopped with a checkpoint. Under tools/launch.py the
    process also leaves a note, since torchrun keeps no worker's status when it was signalled itself."""
    note = _stop_note()
    if note is not None:
        note.write_text(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return STOP_EXIT_STATUS


def _stop_note() -> Path | None:
    folder = os.environ.get(STOP_NOTES_ENV)
    return Path(folder, f"local-rank-{os.environ.get('LOCAL_RANK', '0')}") if folder else None


def parse_signals(names: str) -> tuple[signal.Signals, ...]:
    """``"SIGTERM,SIGUSR1"`` (or ``TERM,USR1``; ``""`` = none) -> the signals; unknown names are refused."""
    found = []
    for name in filter(None, (n.strip().upper() for n in names.split(","))):
        name = name if name.startswith("SIG") else f"SIG{name}"
        if name in ("SIGKILL", "SIGSTOP") or not hasattr(signal.Signals, name):
            raise ConfigError(f"train.stop_signals: {name!r} is not a signal a run can catch; use names such as "
                              f"{DEFAULT_SIGNALS} (or an empty value for none)")
        found.append(signal.Signals[name])
    return tuple(found)


def _say(line: str) -> None:
    """One line to stderr from a signal handler: an unbuffered write, since the handler may run while
    the interrupted code is inside a buffered write to the same stream (the progress bar's)."""
    try:
        os.write(sys.stderr.fileno(), (line + "\n").encode())
    except (OSError, ValueError, AttributeError):  # no usable stderr (closed, replaced by an object)
        pass


class StopSignal:
    """Catches ``signals`` while installed (a context manager); :meth:`requested` says whether any
    process of the job got one. Outside the main thread Python cannot catch signals: nothing is
    installed and the process keeps the default behaviour."""

    def __init__(self, signals: str = DEFAULT_SIGNALS):
        self.signals = parse_signals(signals)
        self.received: signal.Signals | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignal":
        note = _stop_note()
        if note is not None:  # torchrun --max-restarts: an earlier round's stop does not speak for this one
            note.unlink(missing_ok=True)
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        sig = signal.Signals(signum)
        if self.received is None:
            self.received = sig
            _say(f"{sig.name} received: stopping after this step with a checkpoint (send it again to exit at once, "
                 f"without one)")
            return
        # the second signal: die by it, as an uncaught signal would (the last checkpoint is intact)
        _say(f"{sig.name} received again: exiting at once")
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def requested(self, device: torch.device | str = "cpu") -> bool:
        """Whether this process or any other of the job was asked to stop. Every process must call it
        at the same step (it is a collective under torchrun), so all stop at the same step."""
        if not distributed.current().enabled:
            return self.received is not None
        flag = torch.tensor([int(self.received is not None)], device=device)
        return bool(distributed.all_reduce_sum(flag).item())

    def reason(self) -> str:
        return self.received.name if self.received is not None else "a signal to another process of the job"
