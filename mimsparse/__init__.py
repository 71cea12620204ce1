"""mimsparse: sparse masked image modeling on swappable sparse backends.

    import mimsparse
    model = mimsparse.build_model("convnextv2_atto", backend="packed")   # or a config / YAML path
    loss, pred, visible = model(images)                                  # visible: True = kept patch
    sd, name, error = mimsparse.convert_checkpoint(mimsparse.load_checkpoint("checkpoint.pth"), num_classes=10)

The names below load on first use, so ``import mimsparse`` stays cheap.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # config -> model
    "PretrainConfig": "mimsparse.config", "load_config": "mimsparse.config",
    "build_model": "mimsparse.api", "build_encoder": "mimsparse.api", "model_names": "mimsparse.models.registry",
    # masks
    "PatchMasker": "mimsparse.masking", "random_patch_mask": "mimsparse.masking", "upsample_mask": "mimsparse.masking",
    # backends
    "get_backend": "mimsparse.backends", "backend_names": "mimsparse.backends", "backend_status": "mimsparse.backends",
    # checkpoints, conversion, exports
    "load_checkpoint": "mimsparse.api", "load_pretrained": "mimsparse.api",
    "convert_checkpoint": "mimsparse.convert", "save_weights": "mimsparse.convert.export",
    "save_timm_folder": "mimsparse.convert.export", "init_from_dense": "mimsparse.convert.dense_init",
    "MimsparseError": "mimsparse.errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'mimsparse' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
