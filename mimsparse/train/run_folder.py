"""A run folder belongs to one run, and to one process at a time. Every tool that writes one
(pretraining, the official import, finetuning, the linear probe, ablations) guards it here:

- **the lock**: the writing process holds an OS lock (``fcntl.flock``) on ``.mimsparse.lock`` inside
  the folder for its whole life. A second process aimed at the folder is refused at once, with the
  holder's host and PID. The kernel drops the lock when the holder dies, so a crashed or SIGKILLed
  run needs no clean-up. On network file systems (NFS without a lock daemon, some FUSE mounts)
  ``flock`` may only lock on one machine or not at all: start one job per folder there.
- **ownership**: a new run refuses a folder that holds another run's files (it lists each file it
  counts) unless it resumes that run or says ``--overwrite``, which deletes every file of the old
  run, TensorBoard events included.
- **no litter**: a start that fails before its first step removes the folder if it created it, but
  never one another process holds (two starts racing to create one folder both think they made it).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import shutil
import socket
import time
import weakref
from pathlib import Path
from typing import Callable, Iterable

from mimsparse.errors import CheckpointError, OutputError

LOCK_NAME = ".mimsparse.lock"

# Folders this process holds: {real path: [file object, holders]}. flock conflicts between two opens
# of one file even in one process, so library users who build a second trainer on a folder share it.
_HELD: dict[str, list] = {}


class FolderBusy(OutputError):
    """Another process holds the run folder."""


def _holder(lock_path: Path) -> str:
    try:
        text = lock_path.read_text().strip()
    except OSError:
        text = ""
    return text or "a process that did not say who it is"


class FolderLock:
    """The OS lock on the existing ``folder`` (its lock file created if needed), held until
    :meth:`release` or the process ends."""

    def __init__(self, folder: str | Path, tool: str = "mimsparse"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.key = os.path.realpath(self.folder)
        if self.key in _HELD:
            _HELD[self.key][1] += 1
        else:
            _HELD[self.key] = [self._take(tool), 1]
        self._finalizer = weakref.finalize(self, _drop, self.key)

    def _take(self, tool: str):
        try:
            f = open(self.path, "a+")
        except OSError as e:
            raise OutputError(f"cannot create the lock file {str(self.path)!r} ({e.strerror or e}); choose another "
                              f"output folder with --output-dir DIR") from e
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise FolderBusy(f"output folder {str(self.folder)!r} is in use by another run ({_holder(self.path)}); "
                             f"wait for it to end or stop it, then resume with --resume auto, or choose another "
                             f"folder with --output-dir DIR") from None
        except OSError as e:  # a file system without flock (some network mounts)
            f.close()
            raise OutputError(f"cannot lock {str(self.path)!r} ({e.strerror or e}): the file system does not support "
                              f"locks; use a local output folder") from e
        f.seek(0)
        f.truncate()
        f.write(f"host {socket.gethostname()}, PID {os.getpid()}, {tool}, since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
        f.flush()
        return f

    def release(self) -> None:
        self._finalizer()


def _drop(key: str) -> None:
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        del _HELD[key]
        held[0].close()  # closing the only descriptor releases the flock


def first_missing(folder: Path) -> Path | None:
    """The outermost folder of ``folder``'s path that does not exist yet (what a start would create)."""
    missing = None
    for p in [folder, *folder.parents]:
        if p.exists():
            break
        missing = p
    return missing


class RunFolder:
    """A tool's hold on its output folder: the lock, the ownership check, --overwrite, and removal of
    a folder this start created when it fails before its first step (:meth:`abandon`)."""

    def __init__(self, folder: str | Path, tool: str = "mimsparse"):
        from mimsparse.train.checkpoint import check_writable_dir

        self.folder = Path(folder)
        self.created = first_missing(self.folder.absolute())
        self.started = False  # set by the tool once its first step runs: from then on the folder is kept
        check_writable_dir(self.folder)
        try:
            self.lock = FolderLock(self.folder, tool)
        except FolderBusy:  # two starts raced to create it: the folder is the holder's, whoever made it
            raise
        except BaseException:
            self._remove_created()
            raise

    def _remove_created(self) -> None:
        if self.created is not None and self.created.is_dir():
            shutil.rmtree(self.created, ignore_errors=True)

    def abandon(self) -> None:
        """A start failed before its first step: remove the folder if this start created it, then let go."""
        self._remove_created()
        self.release()

    def release(self) -> None:
        self.lock.release()


@dataclasses.dataclass
class UnheldFolder:
    """The run folder as a process that does not write it sees it (a torchrun rank other than 0)."""
    folder: Path
    started: bool = False


@contextlib.contextmanager
def held(folder: str | Path, tool: str, main: bool = True, collective: bool = False, device="cpu"):
    """``with held(out_dir, "tool.py") as folder:`` the run folder for the block: locked, removed on a
    failure before ``folder.started`` is set when this start created it, let go at the end. Under
    torchrun (``collective``) the main process holds it as :func:`hold` says; the others get an
    :class:`UnheldFolder`."""
    run_folder = hold(folder, tool, main, collective, device) if collective else RunFolder(folder, tool)
    if run_folder is None:
        yield UnheldFolder(Path(folder))
        return
    try:
        yield run_folder
    except BaseException:
        if not run_folder.started:
            run_folder.abandon()
        raise
    finally:
        run_folder.release()


def refuse_other_run(folder: str | Path, theirs: Iterable[Path], resuming: bool, overwrite: bool,
                     resumable: bool = True, folder_flag: str = "--output-dir") -> list[Path]:
    """Raise unless a new run may own ``folder``; ``theirs`` are the files a previous run left there
    (each is named in the refusal). Returns those that ``overwrite`` will delete."""
    theirs = [p for p in theirs if p.exists()]
    if resuming or not theirs or overwrite:
        return [] if resuming else theirs
    names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in theirs)
    resume = "Continue that run with --resume auto, choose" if resumable else "Choose"
    raise CheckpointError(
        f"output folder {str(folder)!r} holds the files of another run ({len(theirs)}: {names}); a new run there "
        f"would mix with or delete them. {resume} another folder with {folder_flag} DIR, or replace it with "
        f"--overwrite")


def clear_run_files(folder: str | Path, files: Iterable[Path], say: Callable[[str], None] = print) -> list[str]:
    """``--overwrite``: delete the previous run's files (folders such as tensorboard/ whole)."""
    gone = []
    for p in files:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
            gone.append(p.name + "/")
        elif p.exists() or p.is_symlink():
            p.unlink()
            gone.append(p.name)
    if gone:
        say(f"--overwrite: deleted the previous run's {len(gone)} file(s) in {folder}: {', '.join(gone)}")
    return gone


def hold(folder: str | Path, tool: str, main: bool = True, collective: bool = False, device="cpu") -> RunFolder | None:
    """The run folder of a job: the main process holds it (others write nothing, so they only check
    it can be written); under torchrun every process learns whether it was refused, so none is left
    waiting in a collective."""
    from mimsparse.errors import MimsparseError
    from mimsparse.train.checkpoint import check_writable_dir

    held, error = None, None
    try:
        if main:
            held = RunFolder(folder, tool)
        else:
            check_writable_dir(folder)
    except MimsparseError as e:
        error = e
    if collective:
        import torch

        from mimsparse.train import distributed

        failed = int(distributed.all_reduce_sum(torch.tensor([int(error is not None)], device=device)).item())
        if failed and error is None:  # another process of this job was refused: its line says why
            if held is not None:
                held.abandon()
            error = OutputError(f"output folder {str(folder)!r}: another process of this job could not take it (see "
                                f"its error line)")
    if error is not None:
        raise error
    return held
