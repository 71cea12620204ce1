"""Image -> patch mask: random, block, progressive and importance strategies.

Polarity is fixed across the whole package: ``visible`` is a bool tensor, True = the patch is kept
(fed to the encoder), False = masked (hidden, to be reconstructed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mimsparse.errors import ConfigError


def check_image_size(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """Return the patch grid (h, w); image sides must be multiples of the encoder's patch size."""
    if height % patch_size or width % patch_size or height <= 0 or width <= 0:
        raise ConfigError(
            f"image size {height}x{width} is not divisible by the patch size {patch_size} "
            f"(the encoder's total stride); resize or crop to a multiple of {patch_size}, "
            f"e.g. --img-size {max(patch_size, round(height / patch_size) * patch_size)}"
        )
    return height // patch_size, width // patch_size


def check_mask_ratio(mask_ratio: float) -> float:
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)):
        raise TypeError(f"mask ratio must be a number in [0, 1), got {mask_ratio!r}")
    if not 0.0 <= mask_ratio < 1.0:
        raise ConfigError(
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


# ---- strategies ---------------------------------------------------------------------------------

MASK_STRATEGIES = ("random", "block", "progressive", "importance")


def check_block_shape(min_patches: int, min_aspect: float) -> None:
    if isinstance(min_patches, bool) or not isinstance(min_patches, int) or min_patches < 1:
        raise ConfigError(f"mask.block_min_patches must be an integer >= 1, got {min_patches!r}")
    if not 0.0 < min_aspect <= 1.0:
        raise ConfigError(f"mask.block_min_aspect must be in (0, 1] (aspect ratios are drawn in [a, 1/a]), "
                         f"got {min_aspect}")


def check_random_fraction(random_fraction: float) -> None:
    if not 0.0 <= random_fraction <= 1.0:
        raise ConfigError(f"mask.random_fraction must be in [0, 1], got {random_fraction}")


def block_patch_mask(
    batch_size: int,
    grid_hw: tuple[int, int],
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    min_patches: int = 4,
    min_aspect: float = 0.3,
    return_blocks: bool = False,
):
    """Block-wise mask (BEiT / SimMIM): rectangles of patches are added until exactly round(r*L)
    patches per sample are masked.

    Each block draws an area uniformly in [min(min_patches, remaining), remaining] and an aspect
    ratio log-uniformly in [min_aspect, 1/min_aspect]; it is kept when it adds between 1 and
    ``remaining`` new patches (blocks may overlap earlier ones). After 10 rejected draws a single
    free patch is masked instead, so the loop always ends with the exact count.

    Returns visible_bhw (bool [B, h, w], True = kept) and, with ``return_blocks``, the blocks of
    every sample as lists of (top, left, height, width) in patches.
    """
    check_mask_ratio(mask_ratio)
    check_block_shape(min_patches, min_aspect)
    h, w = grid_hw
    n_mask = num_masked(mask_ratio, h * w)
    masked = torch.zeros(batch_size, h, w, dtype=torch.bool)
    blocks = [_draw_blocks(masked[b], n_mask, min_patches, min_aspect, generator) for b in range(batch_size)]
    visible = (~masked).to(device)
    return (visible, blocks) if return_blocks else visible


def _draw_blocks(masked_hw: torch.Tensor, n_mask: int, min_patches: int, min_aspect: float,
                 generator: torch.Generator | None, attempts: int = 10) -> list[tuple[int, int, int, int]]:
    """Mask rectangles in ``masked_hw`` (in place) until ``n_mask`` patches are masked."""
    h, w = masked_hw.shape
    log_lo, log_hi = math.log(min_aspect), -math.log(min_aspect)
    blocks, remaining = [], n_mask
    while remaining > 0:
        for _ in range(attempts):
            u_area, u_aspect, u_top, u_left = torch.rand(4, generator=generator).tolist()
            low = min(min_patches, remaining)
            area = low + (remaining - low) * u_area
            aspect = math.exp(log_lo + (log_hi - log_lo) * u_aspect)
            bh = min(h, max(1, round(math.sqrt(area * aspect))))
            bw = min(w, max(1, round(math.sqrt(area / aspect))))
            top, left = int(u_top * (h - bh + 1)), int(u_left * (w - bw + 1))
            region = masked_hw[top:top + bh, left:left + bw]
            new = int((~region).sum())
            if 0 < new <= remaining:
                break
        else:  # no block fitted: one free patch (a 1x1 block)
            free = (~masked_hw).flatten().nonzero().squeeze(1)
            index = int(free[int(torch.rand(1, generator=generator).item() * len(free))])
            (top, left), bh, bw = divmod(index, w), 1, 1
            region, new = masked_hw[top:top + 1, left:left + 1], 1
        region.fill_(True)
        blocks.append((top, left, bh, bw))
        remaining -= new
    return blocks


def patch_variance(images_bchw: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, h, w]: variance of each patch's pixel values (all channels together)."""
    b, c, height, width = images_bchw.shape
    h, w = check_image_size(height, width, patch_size)
    p = patch_size
    x = images_bchw.detach().float().reshape(b, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, h, w, c * p * p).var(dim=-1)


def importance_patch_mask(
    scores_bhw: torch.Tensor,
    mask_ratio: float,
    random_fraction: float = 0.25,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mask the highest-scoring patches: of the round(r*L) masked patches per sample,
    round(random_fraction * n) are drawn uniformly from the rest and the others are the top scores
    (ties in random order). The random share keeps the encoder from only ever seeing flat patches.

    scores: [B, h, w], any per-patch score (e.g. :func:`patch_variance`, a reconstruction error).
    Returns visible_bhw: bool [B, h, w] on the scores' device, True = kept.
    """
    check_mask_ratio(mask_ratio)
    check_random_fraction(random_fraction)
    b, h, w = scores_bhw.shape
    length = h * w
    n_mask = num_masked(mask_ratio, length)
    n_random = int(random_fraction * n_mask + 0.5)
    n_top = n_mask - n_random
    scores_bl = scores_bhw.detach().float().cpu().reshape(b, length)
    # a random permutation first, then a stable sort by score: equal scores end up in random order
    shuffle = torch.rand(b, length, generator=generator).argsort(dim=1)
    by_score = shuffle.gather(1, scores_bl.gather(1, shuffle).argsort(dim=1, descending=True, stable=True))
    rest = by_score[:, n_top:]
    picked = rest.gather(1, torch.rand(b, length - n_top, generator=generator).argsort(dim=1)[:, :n_random])
    visible = torch.ones(b, length, dtype=torch.bool)
    visible.scatter_(1, torch.cat([by_score[:, :n_top], picked], dim=1), False)
    return visible.view(b, h, w).to(scores_bhw.device)


def linear_ratio(start: float, end: float, progress: float) -> float:
    """Mask ratio of the progressive strategy: ``start`` at progress 0, ``end`` at 1, linear between."""
    return start + (end - start) * min(1.0, max(0.0, float(progress)))


@dataclass(frozen=True)
class PatchMasker:
    """A mask strategy and its settings (the fields of the config's ``mask`` section).

    - random:      uniform, exactly round(ratio * L) masked patches per sample.
    - block:       rectangles of patches (BEiT / SimMIM block-wise masking), same count.
    - progressive: uniform, with the ratio going linearly from ``start_ratio`` (start of training)
                   to ``ratio`` (end of training).
    - importance:  the patches of highest pixel variance, except a ``random_fraction`` share drawn
                   uniformly from the others.
    """

    strategy: str = "random"
    ratio: float = 0.6
    start_ratio: float = 0.3
    block_min_patches: int = 4
    block_min_aspect: float = 0.3
    random_fraction: float = 0.25

    def __post_init__(self):
        if self.strategy not in MASK_STRATEGIES:
            raise ConfigError(f"mask.strategy must be one of {', '.join(MASK_STRATEGIES)}, got {self.strategy!r}")
        check_mask_ratio(self.ratio)
        check_mask_ratio(self.start_ratio)
        check_block_shape(self.block_min_patches, self.block_min_aspect)
        check_random_fraction(self.random_fraction)

    def ratio_at(self, progress: float = 0.0) -> float:
        """The mask ratio at ``progress`` (fraction of training done, in [0, 1])."""
        if self.strategy == "progressive":
            return linear_ratio(self.start_ratio, self.ratio, progress)
        return self.ratio

    def __call__(self, images_bchw: torch.Tensor, patch_size: int, generator: torch.Generator | None = None,
                 progress: float = 0.0) -> torch.Tensor:
        """bool [B, H/p, W/p], True = visible."""
        b, _, height, width = images_bchw.shape
        grid = check_image_size(height, width, patch_size)
        ratio, device = self.ratio_at(progress), images_bchw.device
        if self.strategy == "block":
            return block_patch_mask(b, grid, ratio, generator, device, self.block_min_patches, self.block_min_aspect)
        if self.strategy == "importance":
            scores = patch_variance(images_bchw, patch_size)
            return importance_patch_mask(scores, ratio, self.random_fraction, generator)
        return random_patch_mask(b, grid, ratio, generator, device)
