"""Image -> patch mask.

Polarity is fixed across the whole package: ``visible`` is a bool tensor, True = the patch is kept
(fed to the encoder), False = masked (hidden, to be reconstructed).
"""
from __future__ import annotations

import torch


def check_image_size(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """Return the patch grid (h, w); image sides must be multiples of the encoder's patch size."""
    if height % patch_size or width % patch_size or height <= 0 or width <= 0:
        raise ValueError(
            f"image size {height}x{width} is not divisible by the patch size {patch_size} "
            f"(the encoder's total stride); resize or crop to a multiple of {patch_size}, "
            f"e.g. --img {max(patch_size, round(height / patch_size) * patch_size)}"
        )
    return height // patch_size, width // patch_size


def check_mask_ratio(mask_ratio: float) -> float:
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)):
        raise TypeError(f"mask ratio must be a number in [0, 1), got {mask_ratio!r}")
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(
            f"mask ratio must be in [0, 1) so that some patches stay visible, got {mask_ratio}"
        )
    return float(mask_ratio)


def num_masked(mask_ratio: float, num_patches: int) -> int:
    """Exactly round(r * L) patches are masked per sample (round half up, like the papers' int(r*L+0.5))."""
    return int(mask_ratio * num_patches + 0.5)


def random_patch_mask(
    batch_size: int,
    grid_hw: tuple[int, int],
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Uniform random mask with exactly round(r*L) masked patches per sample.

    Returns visible_bhw: bool [B, h, w], True = kept.
    """
    check_mask_ratio(mask_ratio)
    h, w = grid_hw
    length = h * w
    n_mask = num_masked(mask_ratio, length)
    noise = torch.rand(batch_size, length, generator=generator, device="cpu")
    # The n_mask patches with the smallest noise are masked: a uniform random subset per sample.
    ranks = noise.argsort(dim=1).argsort(dim=1)
    visible = ranks >= n_mask
    return visible.view(batch_size, h, w).to(device)


def upsample_mask(visible_bhw: torch.Tensor, scale: int) -> torch.Tensor:
    """Repeat each patch's flag over a scale x scale block: the mask at a finer stage's resolution."""
    if scale == 1:
        return visible_bhw
    return visible_bhw.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
