"""Reconstruction targets and loss, per patch."""
from __future__ import annotations

import torch

from mimsparse.errors import ConfigError


def patchify(images_bchw: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, p*p*C], patches in raster order, values ordered (row, col, channel)
    within a patch (the layout MAE and FCMAE use, so predictions interchange with theirs)."""
    b, c, h, w = images_bchw.shape
    p = patch_size
    x = images_bchw.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches_bld: torch.Tensor, patch_size: int, grid_hw: tuple[int, int], chans: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b = patches_bld.shape[0]
    (h, w), p = grid_hw, patch_size
    x = patches_bld.reshape(b, h, w, p, p, chans)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, chans, h * p, w * p)


def pixel_targets(images_bchw: torch.Tensor, patch_size: int, norm_pix: bool) -> torch.Tensor:
    """[B, L, p*p*C]; with ``norm_pix`` each patch is standardised by its own mean and (unbiased)
    variance, as in MAE/FCMAE."""
    target = patchify(images_bchw, patch_size)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    return target


LOSSES = ("mse", "l1")
LOSS_ON = ("masked", "all")


def reconstruction_loss(pred_bld: torch.Tensor, target_bld: torch.Tensor, visible_bl: torch.Tensor,
                        loss: str = "mse", loss_on: str = "masked") -> torch.Tensor:
    """Mean per-value error (``mse``: squared, ``l1``: absolute) averaged per patch, then over the
    masked patches (``loss_on="masked"``: predictions at visible patches get no gradient; with nothing
    masked the loss is 0) or over all patches (``"all"``).

    pred, target: [B, L, D]; visible: bool [B, L], True = kept."""
    if loss not in LOSSES:
        raise ConfigError(f"model.loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if loss_on not in LOSS_ON:
        raise ConfigError(f"model.loss_on must be one of {', '.join(LOSS_ON)}, got {loss_on!r}")
    diff = pred_bld.float() - target_bld.float()
    per_patch = (diff.square() if loss == "mse" else diff.abs()).mean(dim=-1)
    if loss_on == "all":
        return per_patch.mean()
    masked = (~visible_bl).float()
    return (per_patch * masked).sum() / masked.sum().clamp_min(1.0)


def masked_reconstruction_loss(pred_bld: torch.Tensor, target_bld: torch.Tensor, visible_bl: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked patches only (the FCMAE / MAE loss)."""
    return reconstruction_loss(pred_bld, target_bld, visible_bl, "mse", "masked")
