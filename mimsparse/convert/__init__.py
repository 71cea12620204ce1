"""Sparse pretraining checkpoints -> dense models (timm / torchvision; official ConvNeXt-V2 layouts
in ``mimsparse.convert.official``).

Each model family's key mapping lives beside its model (``mimsparse.models.<family>.to_dense``); this
package finds the family in the registry, converts, and checks the result numerically.
"""
from __future__ import annotations

import torch

from mimsparse.convert.common import conversion_error, encoder_state_from_checkpoint
from mimsparse.errors import ConversionError
from mimsparse.models.keymap import check_encoder_entries
from mimsparse.models.registry import family_of

__all__ = ["ConversionError", "check_encoder_entries", "conversion_error", "convert_checkpoint",
           "convert_encoder", "encoder_state_from_checkpoint"]


def convert_encoder(encoder_sd: dict[str, torch.Tensor], model_name: str, num_classes: int = 1000,
                    verify: bool = True, tolerance: float = 1e-4, in_chans: int = 3,
                    encoder_options: dict | None = None) -> tuple[dict[str, torch.Tensor], float | None]:
    """Encoder state dict -> (dense state dict, max relative error or None).

    With ``verify`` the dense model of every library the family exports to (timm; torchvision too for
    ResNet) is loaded strictly from the result and compared with the sparse encoder at mask ratio 0
    in eval mode; above ``tolerance`` a ConversionError is raised."""
    family = family_of(model_name)
    sd = family.to_dense(encoder_sd, model_name, num_classes)
    if not verify:
        return sd, None
    encoder = family.encoder.from_name(model_name, in_chans=in_chans, backend="dense", **(encoder_options or {}))
    encoder.load_state_dict(encoder_sd, strict=True)
    errors = []
    for model, features in family.dense_models(model_name, num_classes, in_chans).values():
        model.load_state_dict(sd, strict=True)
        errors.append(conversion_error(encoder, model, features=features))
    error = max(errors)
    if not error <= tolerance:
        raise ConversionError(f"converted {model_name} differs from the sparse encoder: "
                              f"max relative error {error:.3g} > {tolerance}")
    return sd, error


def convert_checkpoint(ckpt: dict, num_classes: int = 1000, verify: bool = True, tolerance: float = 1e-4):
    """Pretraining checkpoint -> (dense state dict, model name, max relative error or None)."""
    from mimsparse.config import config_from_dict

    encoder_sd, name = encoder_state_from_checkpoint(ckpt)
    cfg = config_from_dict(ckpt["config"]).model
    sd, error = convert_encoder(encoder_sd, name, num_classes, verify, tolerance, cfg.in_chans,
                                family_of(name).encoder_options(cfg))
    return sd, name, error
