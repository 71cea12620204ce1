"""torchrun whose exit status says "stopped with a checkpoint" (75) the way a single process does.

A requeue rule tests that status (``scontrol requeue`` after ``$? -eq 75``, a Kubernetes
``podFailurePolicy`` on exit code 75). Plain torchrun defeats it twice: workers that exit 75 make it
report a failed job and exit 1, and when torchrun itself is signalled (srun, a pod's SIGTERM and a
terminal's Ctrl-C signal torchrun, which starts its workers in sessions of their own) it forwards the
signal, waits for the workers, then exits 1 with a traceback, keeping none of their statuses.

This launcher runs torchrun itself, in this process and with its own arguments, after two settings:
it also forwards SIGUSR1 (SLURM's usual warning signal, which torchrun's default set lacks and dies
of), and it gives the workers a folder in which each one that stopped with a checkpoint leaves a note
(:func:`mimsparse.train.stop_signal.stopped_with_checkpoint`). When every local worker left one, the
exit status is 75, whichever way torchrun ended. Anything else ends as torchrun ends it.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from mimsparse.train.stop_signal import STOP_EXIT_STATUS, STOP_NOTES_ENV

FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"  # torchrun's default set, plus SLURM's SIGUSR1


def every_worker_stopped(notes: Path) -> bool:
    """Whether each local worker (LOCAL_RANK 0 .. LOCAL_WORLD_SIZE-1) noted a stop with a checkpoint."""
    written = {p.name: p.read_text() for p in notes.glob("local-rank-*")}
    if not written:
        return False
    local_world = int(next(iter(written.values())))
    return set(written) == {f"local-rank-{rank}" for rank in range(local_world)}


def main(argv: list[str] | None = None) -> int:
    # torchrun reads its defaults from PET_* variables; an explicit --signals-to-handle still wins
    os.environ.setdefault("PET_SIGNALS_TO_HANDLE", FORWARDED_SIGNALS)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="mimsparse-launch-") as folder:
        os.environ[STOP_NOTES_ENV] = folder  # the workers inherit this process's environment
        try:
            record(run)(args)  # as torchrun runs it: error files and the failure report
            return 0
        except (ChildFailedError, SignalException) as e:
            if every_worker_stopped(Path(folder)):
                print(f"launch: every process stopped with a checkpoint (exit status {STOP_EXIT_STATUS}: requeue, "
                      f"then --resume auto)", file=sys.stderr, flush=True)
                return STOP_EXIT_STATUS
            if isinstance(e, SignalException):  # the workers did not all stop in time (--shutdown-timeout)
                print(f"launch: {e.sigval.name} ended the job before every process had stopped with a checkpoint; "
                      f"the last checkpoint written stays valid (--resume auto)", file=sys.stderr, flush=True)
                return 128 + int(e.sigval)
            raise
