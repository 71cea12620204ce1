"""``train.compile``: torch.compile of the training model, and the mask count that makes it static.

mimsparse's maskers keep exactly L - round(r * L) patches per sample, so for a given batch size,
image size and ratio every shape of the packed backend is a constant once the model is told that
count (``FCMAE.forward(..., num_visible=n)``): the step compiles into one graph with no host sync,
reused for every mask (``dynamic=False``; a new ratio, e.g. under progressive masking, compiles
once more). The other backends ignore the count; the library backends (spconv, minkowski) run
their kernels outside the graph (graph breaks, still correct).
"""
from __future__ import annotations

import torch

from mimsparse.config import ConfigError

COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")


def check_compile_mode(mode: str) -> str:
    if mode not in COMPILE_MODES:
        raise ConfigError(f"train.compile must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    return mode


def compile_model(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """``model`` itself for ``off``, else ``torch.compile(model, mode, dynamic=False)`` (shapes are
    static: see the module docstring). Parameters and state dict stay those of ``model``."""
    if check_compile_mode(mode) == "off":
        return model
    return torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)
