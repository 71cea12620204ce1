"""Checkpoints: atomic writes, plain-data contents (loadable with ``weights_only=True``), checked on load."""
from __future__ import annotations

import hashlib
import os
import platform
import random
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch

from mimsparse.errors import CheckpointError, OutputError


def versions() -> dict[str, str]:
    import timm

    import mimsparse

    return {"mimsparse": mimsparse.__version__, "torch": str(torch.__version__), "timm": timm.__version__,
            "python": platform.python_version()}


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(state: dict, path: str | Path, kept: str | None = None) -> Path:
    """``torch.save(state)`` to ``path`` through :func:`write_file_atomic`."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(state, f)

    return write_file_atomic(path, write, kept)


def write_file_atomic(path: str | Path, write, kept: str | None = None) -> Path:
    """``write(tmp_path)`` fills a temporary file in the same folder, which is fsynced and renamed over
    ``path``: a crash at any moment leaves either the old file or the new one, never a torn file. The
    file gets the mode a new file normally gets (0644 under the usual umask), not mkstemp's 0600.

    An OS error (full disk, permissions, a folder in the way) becomes an :class:`OutputError` naming
    ``path`` and what was kept (``kept``, default: the previous file at ``path`` if any)."""
    path = Path(path)
    try:
        return _replace_atomically(path, write)
    except BaseException as e:
        if isinstance(e, OSError) or _is_write_failure(e):
            if kept is None:
                kept = (f"the previous {path.name} is kept unchanged" if path.is_file()
                        else "nothing was written")
            reason = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0]
            raise OutputError(f"cannot write {str(path)!r} ({reason}); {kept}. Free disk space or choose "
                              f"another output path") from e
        raise


def _replace_atomically(path: Path, write) -> Path:
    """``write(tmp_path)`` into a temporary file beside ``path``, usual file mode, fsync, rename over
    ``path``, fsync the folder; the temporary file is removed on any failure."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(21, "a folder of that name is in the way", str(path))
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            write(tmp)
        except Exception as e:  # noqa: BLE001 (writers report a failed write in their own types)
            if isinstance(e, OSError) or not _is_write_failure(e):
                raise
            raise WriteFailed(_failed_write_reason(e, path.parent)) from e
        os.chmod(tmp, default_file_mode())  # after writing: some writers replace the file they are given
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


class WriteFailed(OSError):
    """A writer library (torch's zip writer, safetensors) failed to write its file."""


# How writer libraries word a failed write: torch's zip writer (a RuntimeError from inline_container.cc,
# e.g. "unexpected pos 42747712 vs 42747604" on a full disk), safetensors (SafetensorError: IoError(...)).
_WRITE_FAILURES = ("PytorchStreamWriter failed writing", "file write failed", "inline_container.cc",
                   "unexpected pos", "IoError", "No space left on device")


def _is_write_failure(e: BaseException) -> bool:
    return ((isinstance(e, RuntimeError) or type(e).__name__ == "SafetensorError")
            and any(s in str(e) for s in _WRITE_FAILURES))


def _failed_write_reason(e: BaseException, folder: Path) -> str:
    """What a user can act on: a full disk said as such (the writers' own words are positions and
    internal codes); otherwise the writer's first line. Checked while the partial file still fills
    the disk."""
    text = str(e)
    if any(s in text for s in ("No space left on device", "os error 28", "StorageFull")):
        return "No space left on device"
    try:
        if shutil.disk_usage(folder).free < (1 << 20):
            return "No space left on device"
    except OSError:
        pass
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def default_file_mode() -> int:
    """0o666 minus the process umask: the mode ``open(path, "w")`` would give a new file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Small text files (run.json, config.yaml, a rewritten log): the same temp-then-rename guarantee;
    an OS error stays an OSError for the caller to word (it knows what was kept)."""
    return _replace_atomically(Path(path), lambda tmp: Path(tmp).write_text(text))


def check_writable_dir(folder: str | Path) -> Path:
    """Create ``folder`` if needed and prove a file can be written there, before any training time
    is spent (a read-only mount, a path below a regular file, a full disk)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CheckpointError(f"output folder {str(folder)!r} is not writable ({e.strerror or e}); "
                              f"choose another with --output-dir DIR (train.output_dir)") from e
    return folder


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete temporary files that a process killed in the middle of :func:`save_checkpoint` or
    :func:`write_text_atomic` left behind (``.<name>.<random>.tmp``); finished files are never touched."""
    folder = Path(folder)
    stale = sorted([*folder.glob(".checkpoint-*.pth.*.tmp"), *folder.glob(".run.json.*.tmp"),
                    *folder.glob(".log.jsonl.*.tmp"), *folder.glob(".config.yaml.*.tmp")])
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def verify_checkpoint(path: str | Path, sha256: str | None = None) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is an intact torch file: not empty, every member of
    its zip container matches its stored CRC-32 (torch.load itself never checks them, so flipped
    bytes would load silently), and, when ``sha256`` is given (the digest recorded when it was
    written), the whole file hashes to it."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is a folder; pass a .pth file in it (or, to continue a "
                              f"run, --resume auto with --output-dir {path})")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; pass the path of a .pth written by "
                              f"tools/pretrain.py")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is empty (0 bytes); use an earlier checkpoint from the "
                              f"same folder")
    if sha256 is not None and file_sha256(path) != sha256:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: its SHA-256 differs from the one recorded when "
                              f"it was written; use an earlier checkpoint from the same folder")
    if not zipfile.is_zipfile(path):
        return  # torch's legacy (pre-1.6) format has no checksums; torch.load checks what it can
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()  # reads every member and compares its CRC-32
    except Exception as e:  # noqa: BLE001 (a damaged header: BadZipFile, UnicodeDecodeError, NotImplementedError ...)
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged (its zip headers are unreadable: "
                              f"{type(e).__name__}: {e}); use an earlier checkpoint from the same folder") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: member {bad!r} fails its CRC-32 check; use an "
                              f"earlier checkpoint from the same folder")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _looks_like_torch_file(path: Path) -> bool:
    """torch.save writes a zip (``PK``) or, before torch 1.6, a pickle (protocol 2+: ``0x80``)."""
    with open(path, "rb") as f:
        head = f.read(2)
    return head == b"PK" or head[:1] == b"\x80"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", sha256: str | None = None) -> dict:
    """Verify (:func:`verify_checkpoint`), then ``torch.load(weights_only=True)``; any failure is one
    :class:`CheckpointError` naming the file."""
    path = Path(path)
    verify_checkpoint(path, sha256)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for torn or foreign files
        first = (str(e).strip().splitlines() or [""])[0][:200]
        why = f"{type(e).__name__}: {first}" if first else type(e).__name__
        if not _looks_like_torch_file(path):  # a config, an image, a log: no earlier checkpoint will help
            raise CheckpointError(f"{str(path)!r} is not a torch checkpoint (neither a zip nor a pickle file); pass a "
                                  f".pth checkpoint written by tools/pretrain.py (checkpoint-NNNNNNN.pth in its "
                                  f"output folder)") from e
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated or not a torch checkpoint ({why}); use an "
                              f"earlier checkpoint from the same folder") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(ckpt).__name__}, expected a dict")
    return ckpt


TRAINING_KEYS = ("model", "config")


def require_training_checkpoint(ckpt: dict, path: str | Path, keys=TRAINING_KEYS) -> None:
    """A file written by tools/pretrain.py has ``model`` (the FCMAE state dict) and ``config``; a bare
    state dict (timm, torchvision, the official weights) has neither."""
    missing = [k for k in keys if k not in ckpt]
    if missing:
        hint = ("it looks like a bare state dict (e.g. official or timm weights); import official FCMAE "
                "weights with tools/convert_official.py import" if "model" in missing else
                "it was not written by tools/pretrain.py")
        raise CheckpointError(f"{str(path)!r} is not a mimsparse pretraining checkpoint (no "
                              f"{', '.join(repr(k) for k in missing)}); {hint}")


def all_finite(state_dict: dict) -> bool:
    """Whether every floating-point tensor of a state dict is finite (NaN/inf weights are not a checkpoint)."""
    return all(bool(torch.isfinite(v).all()) for v in state_dict.values()
               if isinstance(v, torch.Tensor) and v.is_floating_point())


def check_model_matches(ckpt: dict, model_name: str, path: str | Path = "checkpoint") -> None:
    saved = ckpt.get("config", {}).get("model", {}).get("name")
    if saved != model_name:
        raise CheckpointError(f"{path} was trained as {saved!r} but the config asks for {model_name!r}; "
                              f"set model.name={saved} or start a new run")
