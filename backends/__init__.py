"""Backend registry: ``get_backend(name)``. Each backend module imports its library lazily."""
from __future__ import annotations

import importlib

from mimsparse.errors import BackendUnavailable

from .base import Backend
from .rows import RowBackend

# name -> (module, class, how to install what it needs)
_BACKENDS: dict[str, tuple[str, str, str]] = {
    "dense": ("mimsparse.backends.dense", "MaskedDenseBackend", "always available (plain torch)"),
    "packed": ("mimsparse.backends.packed", "PackedBackend", "always available (plain torch)"),
    "spconv": ("mimsparse.backends.spconv", "SpconvBackend",
               "pip install spconv-cu120 (Python <= 3.11; spconv-cu126 on newer), or run `make setup`"),
    "minkowski": ("mimsparse.backends.minkowski", "MinkowskiBackend",
                  "bash scripts/build_minkowski.sh .venv/bin/python (builds MinkowskiEngine 0.5.4), or `make setup`"),
}


def backend_names() -> list[str]:
    return list(_BACKENDS)


def get_backend(name: str) -> Backend:
    if name not in _BACKENDS:
        raise BackendUnavailable(
            f"unknown backend {name!r}; available backends: {', '.join(_BACKENDS)}"
        )
    module_name, class_name, install_hint = _BACKENDS[name]
    try:
        module = importlib.import_module(module_name)
        return getattr(module, class_name)()
    except ImportError as e:
        raise BackendUnavailable(
            f"backend {name!r} needs a library that is not installed ({e}); to install: {install_hint}"
        ) from e


def backend_status() -> dict[str, str]:
    """name -> 'ok' or the reason it cannot be used (for benchmarks and `--help`)."""
    status = {}
    for name in _BACKENDS:
        try:
            get_backend(name)
            status[name] = "ok"
        except BackendUnavailable as e:
            status[name] = str(e)
    return status


__all__ = ["Backend", "RowBackend", "BackendUnavailable", "backend_names", "backend_status", "get_backend"]
