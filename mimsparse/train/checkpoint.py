"""Checkpoints: atomic writes, plain-data contents (loadable with ``weights_only=True``), checked on load."""
from __future__ import annotations
from mimsparse.errors import CheckpointError

import os
import platform
import random
import tempfile
from pathlib import Path

import torch


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


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``: a crash at
    any moment leaves either the old checkpoint or the new one, never a torn file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoints to {str(path.parent)!r} ({e.strerror}); "
                              f"choose a writable folder with train.output_dir=DIR") from e
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


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
    """Delete temporary files that a process killed in the middle of :func:`save_checkpoint` left
    behind (``.<name>.<random>.tmp``); finished checkpoints are never touched."""
    stale = sorted(Path(folder).glob(".checkpoint-*.pth.*.tmp"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; pass the path of a .pth written by tools/pretrain.py")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for torn or foreign files
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated or not a torch checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}); use an earlier checkpoint from the same folder") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(ckpt).__name__}, expected a dict")
    return ckpt


def check_model_matches(ckpt: dict, model_name: str, path: str | Path = "checkpoint") -> None:
    saved = ckpt.get("config", {}).get("model", {}).get("name")
    if saved != model_name:
        raise CheckpointError(f"{path} was trained as {saved!r} but the config asks for {model_name!r}; "
                              f"set model.name={saved} or start a new run")
