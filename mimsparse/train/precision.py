"""Mixed precision (``train.amp`` of pretraining, ``--amp`` of finetuning): which autocast dtype a run
computes in, and whether its device and backend can."""
from __future__ import annotations

import torch

from mimsparse.backends import Backend
from mimsparse.errors import ConfigError

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(amp: str, device: torch.device | str, setting: str = "train.amp") -> torch.dtype | None:
    """A precision name -> its autocast dtype (None for "none"), or a ConfigError naming ``setting`` as
    the user writes it (``train.amp`` in a config, ``--amp`` on a command line) when ``device`` cannot run it."""
    def spelled(value: str) -> str:
        return f"{setting} {value}" if setting.startswith("--") else f"{setting}={value}"

    if amp not in AMP_DTYPES:
        raise ConfigError(f"{setting} must be one of {', '.join(AMP_DTYPES)}, got {amp!r}")
    device_type = torch.device(device).type
    # bf16 autocast runs on CPU too (dense, packed); fp16 needs loss scaling and is slow there
    if amp == "fp16" and device_type != "cuda":
        raise ConfigError(f"{spelled('fp16')} is for CUDA (it needs loss scaling and is slow elsewhere); on "
                          f"{device_type} use {spelled('bf16')} or {spelled('none')}")
    return AMP_DTYPES[amp]


def check_amp(amp: str, backend: Backend, device: torch.device) -> torch.dtype | None:
    """``train.amp`` -> autocast dtype, or a ConfigError/TypeError with the reason it cannot run here."""
    dtype = autocast_dtype(amp, device)
    if dtype is not None:
        backend.check_dtype(dtype, torch.device(device))
    return dtype
