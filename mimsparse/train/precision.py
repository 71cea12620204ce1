"""``train.amp``: which autocast dtype a run computes in, and whether its backend and device can."""
from __future__ import annotations

import torch

from mimsparse.backends import Backend
from mimsparse.errors import TrainingError

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_amp(amp: str, backend: Backend, device: torch.device) -> torch.dtype | None:
    """``train.amp`` -> autocast dtype, or a TrainingError/TypeError with the reason it cannot run."""
    if amp not in AMP_DTYPES:
        raise TrainingError(f"train.amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}")
    dtype = AMP_DTYPES[amp]
    if dtype is not None:
        # bf16 autocast runs on CPU too (dense, packed); fp16 needs loss scaling and is slow there
        if dtype == torch.float16 and torch.device(device).type != "cuda":
            raise TrainingError(f"train.amp=fp16 is for CUDA; on {torch.device(device).type} use train.amp=bf16 "
                                f"(dense and packed backends) or train.amp=none")
        backend.check_dtype(dtype, torch.device(device))
    return dtype
