"""The run folder's checkpoints: which run owns the folder, naming, rotation, best, latest, verified resume,
and the free space a start needs.

A run folder holds ``run.json`` (the owning run's id and the SHA-256 of every checkpoint it wrote),
``checkpoint-NNNNNNN.pth`` (step checkpoints: the newest ``train.keep_last`` of epoch ends and run ends,
and the newest resume point, periodic or a signal's stop, which the next checkpoint supersedes) and
``checkpoint-best.pth``. Rules, each against a way of losing data:

- a fresh run refuses a folder that holds another run's files (resume it, or say ``--overwrite``; see
  :mod:`mimsparse.train.run_folder`);
- rotation deletes only step checkpoints this run recorded in ``run.json``, matched by the exact name
  (never ``checkpoint-0000004-mybackup.pth`` or a file another run wrote);
- a checkpoint is verified on load (zip CRCs, and the recorded SHA-256), and ``--resume auto`` falls back
  to the newest one that verifies, saying which were skipped and why;
- weights that are not finite are never written as a checkpoint.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable

import torch

from mimsparse.train.checkpoint import all_finite, file_sha256, load_checkpoint, save_checkpoint, write_text_atomic
from mimsparse.errors import CheckpointError, OutputError, TrainingError
from mimsparse.train.run_folder import clear_run_files, refuse_other_run

RUN_FILE = "run.json"
BEST_NAME = "checkpoint-best.pth"
RUN_FILES = (BEST_NAME, "log.jsonl", "tensorboard", "vis")  # besides the step checkpoints
EXTRA_FILES = (RUN_FILE, "config.yaml", "wandb")  # also deleted by --overwrite, but no run by themselves
STEP_NAME = re.compile(r"^checkpoint-(\d{7})\.pth$")


def step_name(step: int) -> str:
    return f"checkpoint-{step:07d}.pth"


def step_checkpoints(folder: str | Path) -> list[Path]:
    """``checkpoint-NNNNNNN.pth`` files of ``folder`` (exact name), oldest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_NAME.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: str | Path) -> Path | None:
    found = step_checkpoints(folder)
    return found[-1] if found else None


def link_best(path: Path, digest: str, state: dict) -> str:
    """checkpoint-best.pth beside the step checkpoint ``path`` (of SHA-256 ``digest``) as a hard link to
    it (no second copy on disk; it outlives the step file's rotation), swapped in atomically; a full
    copy of ``state`` where the file system has no hard links. Returns its SHA-256."""
    best = path.parent / BEST_NAME
    tmp = path.parent / f".{BEST_NAME}.link.tmp"  # removed by remove_stale_temp_files after a crash
    try:
        tmp.unlink(missing_ok=True)
        os.link(path, tmp)
        os.replace(tmp, best)
        return digest
    except OSError:
        tmp.unlink(missing_ok=True)
        save_checkpoint(state, best, kept=f"{path.name} was written; the previous {BEST_NAME} is kept")
        return file_sha256(best)


class CheckpointManager:
    """Checkpoints of one run in ``folder``. Call :meth:`claim` before the first write."""

    def __init__(self, folder: str | Path, keep_last: int):
        self.folder = Path(folder)
        self.keep_last = keep_last      # 0 = keep every step checkpoint
        self.record: dict | None = None  # run.json once claimed
        self.last_good: Path | None = None  # newest checkpoint known to hold finite weights

    def kept(self) -> str:
        """What an error that stops the run leaves to go back to."""
        last = self.last_good  # written by this run (finite weights) or resumed from
        return f"the last good checkpoint {str(last)!r} is kept" if last else "no checkpoint was written yet"

    @property
    def run_file(self) -> Path:
        return self.folder / RUN_FILE

    # ---- ownership -------------------------------------------------------------------------------
    def read_record(self) -> dict | None:
        try:
            record = json.loads(self.run_file.read_text())
        except (OSError, ValueError):
            return None  # absent, or torn by a crash: the checkpoints still verify by their zip CRCs
        return record if isinstance(record, dict) and isinstance(record.get("checkpoints"), dict) else None

    def claim(self, resuming: bool, overwrite: bool = False, say: Callable[[str], None] = print) -> str:
        """Make this run the owner of the folder and return its id. A resumed run keeps the folder's
        record (its checkpoints stay its own); a fresh run refuses a folder with another run's files
        unless ``overwrite``, which first deletes everything of that run."""
        if self.record is not None:
            return self.record["run_id"]
        record = self.read_record() if resuming else None
        if not resuming and self.check_can_start(resuming, overwrite):
            clear_run_files(self.folder, self.run_files() + [self.folder / name for name in EXTRA_FILES], say)
        if record is None:
            record = {"run_id": uuid.uuid4().hex, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "checkpoints": {}}
        self.record = record
        self._write_record()
        return record["run_id"]

    def run_files(self) -> list[Path]:
        """What makes the folder another run's: its checkpoints, log, TensorBoard events, pictures."""
        return step_checkpoints(self.folder) + [self.folder / name for name in RUN_FILES]

    def check_can_start(self, resuming: bool, overwrite: bool = False) -> list[Path]:
        """Read-only part of :meth:`claim` (every process of a torchrun job runs it, so all stop
        together): raise unless this start may own the folder; returns the other run's files
        that ``overwrite`` will replace."""
        return refuse_other_run(self.folder, self.run_files(), resuming, overwrite)

    def has_checkpoints(self) -> bool:
        return bool(step_checkpoints(self.folder)) or (self.folder / BEST_NAME).is_file()

    def note(self, key: str, value) -> None:
        """Keep ``value`` under ``key`` in run.json (after :meth:`claim`), e.g. the file the run started from."""
        if self.record.get(key) != value:
            self.record[key] = value
            self._write_record()

    def _write_record(self) -> None:
        try:
            write_text_atomic(self.run_file, json.dumps(self.record, indent=1) + "\n")
        except OSError as e:
            raise OutputError(f"cannot write {str(self.run_file)!r} ({e.strerror or e}); the checkpoints in "
                              f"{str(self.folder)!r} are kept. Free disk space or choose another output folder") from e

    def digest(self, path: str | Path) -> str | None:
        """The SHA-256 recorded when this folder's run wrote ``path`` (None: not written by it)."""
        path = Path(path)
        record = self.record or self.read_record() or {"checkpoints": {}}
        if path.parent.resolve() != self.folder.resolve():
            return None
        return record["checkpoints"].get(path.name)

    # ---- writing ---------------------------------------------------------------------------------
    def save(self, state: dict, step: int, is_best: bool = False, resume_point: bool = False) -> Path:
        """Write the step checkpoint (and the best one), record their digests, rotate. ``resume_point``:
        a checkpoint within an epoch (periodic, or a signal's stop), named in run.json's "resume_point",
        deleted once a newer checkpoint is written and not counted by ``keep_last``, so frequent ones do
        not push the epochs' out. Refuses weights that are not finite: they are no checkpoint to go
        back to."""
        if self.record is None:
            raise RuntimeError("CheckpointManager.claim() must run before the first save")
        if not all_finite(state["model"]):
            kept = f"the last good checkpoint {str(self.last_good)!r} is kept" if self.last_good else \
                "no checkpoint was written"
            raise TrainingError(f"the weights at step {step} are not finite (NaN/inf); they were not saved and {kept}. "
                                f"Lower optim.base_lr or set train.clip_grad")
        path = self.folder / step_name(step)
        kept = (f"the previous checkpoint {str(self.last_good)!r} is kept" if self.last_good
                else "no earlier checkpoint of this run exists")
        save_checkpoint(state, path, kept=kept)
        self.record["checkpoints"][path.name] = file_sha256(path)
        if is_best:
            self.record["checkpoints"][BEST_NAME] = link_best(path, self.record["checkpoints"][path.name], state)
        self.last_good = path
        superseded = self.record.get("resume_point")
        if self.keep_last > 0 and superseded and superseded != path.name:  # 0 keeps every checkpoint, these too
            (self.folder / superseded).unlink(missing_ok=True)
            self.record["checkpoints"].pop(superseded, None)
        self.record["resume_point"] = path.name if resume_point else None
        self.rotate()
        return path

    def rotate(self) -> list[Path]:
        """Delete this run's step checkpoints beyond the newest ``keep_last``; returns what was deleted."""
        if self.keep_last <= 0:
            self._write_record()
            return []
        resume_point = self.record.get("resume_point")
        mine = [p for p in step_checkpoints(self.folder) if p.name in self.record["checkpoints"] and p.name != resume_point]
        old = mine[:-self.keep_last]
        for p in old:
            p.unlink(missing_ok=True)
            self.record["checkpoints"].pop(p.name, None)
        self._write_record()
        return old

    # ---- reading ---------------------------------------------------------------------------------
    def load(self, path: str | Path, map_location="cpu") -> dict:
        """Load a checkpoint, verified against its recorded digest when this folder's run wrote it."""
        ckpt = load_checkpoint(path, map_location, sha256=self.digest(path))
        if "model" in ckpt and not all_finite(ckpt["model"]):
            raise CheckpointError(f"checkpoint {str(path)!r} holds non-finite (NaN/inf) weights; use an earlier "
                                  f"checkpoint from the same folder")
        return ckpt

    def load_latest(self, map_location="cpu", say: Callable[[str], None] = print) -> tuple[Path, dict] | None:
        """The newest step checkpoint that verifies and loads (``--resume auto``); each newer one that
        does not is named with the reason. None when the folder holds no step checkpoint."""
        candidates = step_checkpoints(self.folder)
        if not candidates:
            return None
        reasons = []
        for path in reversed(candidates):
            try:
                return path, self.load(path, map_location)
            except CheckpointError as e:
                reasons.append(f"{path.name}: {e}")
                say(f"--resume auto: skipped {path} ({e})")
        raise CheckpointError(f"--resume auto: no checkpoint in {str(self.folder)!r} verifies ({'; '.join(reasons)}); "
                              f"start a new run with --overwrite or in another folder")



def checkpoint_size_estimate(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of a training checkpoint: the model state plus AdamW's two moments per parameter, plus
    a small margin for the scheduler, config and RNG state."""
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    moments = 2 * param_bytes if optimizer is not None else 0
    return model_bytes + moments + (1 << 20)


def check_free_space(folder: Path, needed_bytes: int) -> None:
    """Refuse to start when the folder's disk cannot hold one more checkpoint (the atomic write
    needs the new file beside the old one)."""
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise OutputError(f"output folder {str(folder)!r} has {free / 2**20:.1f} MiB free but one checkpoint "
                          f"of this run needs about {needed_bytes / 2**20:.1f} MiB; free disk space or choose "
                          f"another folder with --output-dir DIR")
