"""What a resume continues: the config the checkpoint was trained with, the user's changes on top.

The checkpoint records its run's config; ``--config`` and overrides given with ``--resume`` change it
key by key (MAE and timm keep a run's arguments when it resumes; so do we). Every difference is said.
Keys that change what the weights mean (the model, its decoder, its objective) are refused; the others
take effect from the step reached: the lr schedule is a function of the epoch position, so it is
rebuilt from the new values without restarting the warm-up. Keys that change which images make an
epoch's batches take effect at an epoch boundary only, where no half-seen epoch has to be re-cut.
``run.json`` keeps the history of changes by step.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from mimsparse.config import PretrainConfig, _merge, config_from_dict
from mimsparse.errors import CheckpointError

# read at a fresh start only (the weights come from the checkpoint on resume; the run's record restores them)
NOT_READ_ON_RESUME = ("model.init", "model.init_sha256")
# model.* except drop_path (a regulariser): the encoder and its patch geometry, the decoder, the objective
MEANING_KEYS = tuple(k for k in (f"model.{f.name}" for f in dataclasses.fields(PretrainConfig().model))
                     if k != "model.drop_path" and k not in NOT_READ_ON_RESUME)
# which images each step of an epoch sees (the sampler's position is a batch index within the epoch)
EPOCH_KEYS = ("data.path", "data.repeat", "train.batch_size", "train.accum_steps", "train.seed")


def flat(cfg: PretrainConfig | dict) -> dict:
    """{"section.key": value} of a config."""
    d = cfg.to_dict() if isinstance(cfg, PretrainConfig) else cfg
    return {f"{section}.{key}": value for section, values in d.items() for key, value in values.items()}


def recorded_config(ckpt: dict, path) -> dict:
    """The checkpoint's config as a nested dict, limited to the keys this version knows (an older
    run may record keys since removed; keys added since take their defaults)."""
    stored = ckpt.get("config")
    if not isinstance(stored, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} records no config; it is not a checkpoint of "
                              f"tools/pretrain.py (pass such a checkpoint to --resume)")
    known = PretrainConfig().to_dict()
    return {s: {k: v for k, v in values.items() if k in known[s]}
            for s, values in stored.items() if s in known and isinstance(values, dict)}


def resumed_config(ckpt: dict, path, updates: dict) -> PretrainConfig:
    """The checkpoint's config with the user's ``updates`` (a nested dict: YAML file, flags, overrides)."""
    return config_from_dict(_merge(recorded_config(ckpt, path), updates))


def config_changes(old: PretrainConfig | dict, new: PretrainConfig) -> dict[str, tuple]:
    """{"section.key": (old value, new value)} for every key that differs (``model.init`` aside: a
    resume does not read it, and says so itself)."""
    before, after = flat(old), flat(new)
    return {k: (before.get(k), v) for k, v in after.items() if before.get(k) != v and k not in NOT_READ_ON_RESUME}


def check_changes(changes: dict[str, tuple], path, batch_in_epoch: int, epoch: int) -> None:
    """Refuse, in one line, a change the checkpoint cannot continue under."""
    fixed = [k for k in changes if k in MEANING_KEYS]
    if fixed:
        said = ", ".join(f"{k} {changes[k][0]!r} -> {changes[k][1]!r}" for k in fixed)
        raise CheckpointError(f"--resume {str(path)!r}: cannot change {said}: it changes what the checkpoint's "
                              f"weights mean (model, decoder or objective); resume without it, or start a new run "
                              f"in another folder (--output-dir DIR)")
    cut = [k for k in changes if k in EPOCH_KEYS]
    if cut and batch_in_epoch:
        raise CheckpointError(f"--resume {str(path)!r}: {', '.join(cut)} can change at an epoch boundary only, and "
                              f"this checkpoint stopped {batch_in_epoch} batch(es) into epoch {epoch}; resume "
                              f"without the change, or from a checkpoint written at the end of an epoch")


def describe(changes: dict[str, tuple]) -> list[str]:
    return [f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items()]


def changes_history(record: dict, step: int, changes: dict[str, tuple], command: str) -> list[dict]:
    """``run.json``'s history of config changes with this resume's appended (kept across resumes)."""
    return [*record.get("config_changes", []),
            {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command,
             "changes": {k: list(v) for k, v in changes.items()}}]


def resume_folder(resume: str, output_dir: str | None) -> Path | None:
    """The run folder a resume writes to: ``--output-dir`` when given, else the checkpoint's folder
    (``auto``: the config's output folder, resolved by the caller)."""
    if output_dir:
        return Path(output_dir)
    return None if str(resume) == "auto" else Path(resume).parent
