"""Moving rows between the packed layout [N, C] and dense maps, the helpers the ops build on: a zero map
with the rows written at their sites, the rows read back at those sites, a zero row appended so that
index N reads zero, and the rows of rectangular windows of the map (conv windows, halo tiles)."""
from __future__ import annotations

import torch


def _scatter_static(rows, flat, dims) -> torch.Tensor:
    """rows [N, C] -> [B, C, H, W] (channels-last memory), zero where no row lands."""
    b, h, w = dims
    c = rows.shape[1]
    return rows.new_zeros(b * h * w, c).index_copy(0, flat, rows).view(b, h, w, c).permute(0, 3, 1, 2)


def _gather_static(dense_bchw, flat) -> torch.Tensor:
    """The rows at ``flat`` of a [B, C, H, W] map: a view of channels-last memory, one copy otherwise
    (reshape copies exactly when the NHWC permute is not contiguous)."""
    return dense_bchw.permute(0, 2, 3, 1).reshape(-1, dense_bchw.shape[1]).index_select(0, flat)


def _pad_row(rows: torch.Tensor) -> torch.Tensor:
    """rows with a zero row appended (index N reads zero)."""
    return torch.cat([rows, rows.new_zeros(1, rows.shape[1])])


def window_rows(dense_to_row: torch.Tensor, hw: tuple[int, int], n: int, b: torch.Tensor, y0: torch.Tensor,
                x0: torch.Tensor, th: int, tw: int) -> torch.Tensor:
    """int64 [P, th, tw]: the row at each site of the th x tw windows whose top-left sites are (y0, x0) in
    samples ``b`` (each [P]), ``n`` where a site is inactive or outside the H x W map ``hw``.
    ``dense_to_row``: int64 [B*H*W], the row of each dense position (``n`` = inactive)."""
    h, w = hw
    yy = y0[:, None] + torch.arange(th, device=b.device)    # [P, th]
    xx = x0[:, None] + torch.arange(tw, device=b.device)    # [P, tw]
    inside = ((yy >= 0) & (yy < h))[:, :, None] & ((xx >= 0) & (xx < w))[:, None, :]
    pos = (b[:, None, None] * h + yy.clamp(0, h - 1)[:, :, None]) * w + xx.clamp(0, w - 1)[:, None, :]
    return torch.where(inside, dense_to_row[pos], n)
