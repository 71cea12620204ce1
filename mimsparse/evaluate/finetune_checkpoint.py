"""A finetuning run's last.pth: everything ``--resume`` needs to continue exactly as if the run had not
stopped (weights, optimizer, loss scaler, weight average, every process's RNG state, the position
within a stopped epoch)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mimsparse.convert.export import load_weights_file
from mimsparse.train import distributed
from mimsparse.train.checkpoint import CheckpointError, write_file_atomic


def resume_path(resume: str | None, last_path: Path) -> Path | None:
    """``--resume``: None (start fresh), "auto" (the output folder's last.pth if there is one) or a path."""
    if resume is None:
        return None
    if resume == "auto":
        return last_path if last_path.is_file() else None
    if not Path(resume).is_file():
        raise CheckpointError(f"--resume {resume}: no such file; pass a last.pth written by tools/finetune.py or auto")
    return Path(resume)


def rng_state() -> dict:
    """torch (drop path) and NumPy (timm's mixup / cutmix) generators, as tensors (weights_only loads them)."""
    np_state = np.random.get_state(legacy=False)
    return {"torch": torch.get_rng_state(), "numpy_key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "numpy_pos": int(np_state["state"]["pos"]), "numpy_has_gauss": int(np_state["has_gauss"]),
            "numpy_gauss": float(np_state["gauss"])}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": state["numpy_key"].numpy().astype(np.uint32),
                                                                "pos": state["numpy_pos"]},
                         "has_gauss": state["numpy_has_gauss"], "gauss": state["numpy_gauss"]})


def save_resume_state(path: Path, run, epoch: int, step: int, history: list, best: dict,
                      part: dict | None = None) -> None:
    """Everything ``--resume`` needs, written atomically (mode 0644) by rank 0: the run continues exactly
    as if it had not stopped (data order and augmentation derive from (seed, epoch); the RNGs of every
    process are restored). ``part``: where a signal stopped the epoch ``epoch`` (see
    :func:`train_one_epoch`). Every process calls it (the RNG states are gathered)."""
    job = distributed.current()
    rngs = [rng_state()]
    if job.enabled:
        rngs = [None] * job.world_size
        torch.distributed.all_gather_object(rngs, rng_state())
    if not job.is_main:
        return
    state = {"model": weights_of(run.model), "optimizer": run.optimizer.state_dict(), "epoch": epoch, "step": step,
             "history": history, "best": best, "model_name": run.name, "classes": list(run.train.classes),
             "rng": rngs[0], "rng_per_process": rngs, "part": part, "scaler": run.scaler.state_dict(),
             "ema": weights_of(run.ema.module) if run.ema is not None else None,
             "layout": {"batch_size": run.batch_size, "processes": job.world_size, "accum": run.options.accum}}
    write_file_atomic(path, lambda tmp: torch.save(state, tmp))


def weights_of(model) -> dict:
    """A state dict on the CPU, detached."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def load_resume_state(path: Path, name: str, classes) -> dict:
    state, _ = load_weights_file(path)
    if not {"model", "optimizer", "epoch", "step"} <= state.keys():
        raise CheckpointError(f"{path} is not a finetuning checkpoint (last.pth of tools/finetune.py)")
    if state["model_name"] != name or list(state["classes"]) != list(classes):
        raise CheckpointError(f"{path} finetuned {state['model_name']} on classes {list(state['classes'])[:5]}, this "
                              f"run is {name} on {list(classes)[:5]}; resume with the same --model and --data")
    return state
