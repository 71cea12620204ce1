"""Moving rows between the packed layout [N, C] and dense maps, the three helpers the ops build on: a zero
map with the rows written at their sites, the rows read back at those sites, a zero row appended so that
index N reads zero."""
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
