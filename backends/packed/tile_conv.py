"""k x k convolutions (any stride) over halo tiles: the output sites are covered by the s x s blocks that
hold them (the mask's patches at that stage), each block's input window (its ``(s - 1) * stride + k``
square, halo included, zero where inactive or outside the map) is gathered from the rows, and one oneDNN
conv with padding 0 over all tiles gives exactly the blocks' outputs. Compute is the active area; the
memory read is the tile input, 1.56x the active area for ResNet-50's stage-1 3x3 (8x8 blocks), against
the gather-GEMM's k*k = 9x (gather_conv.py). Plain differentiable torch (index_select, conv2d), so
autograd and static mode under ``torch.compile`` need nothing more; the index tables are cached on the
output geometry and built without host syncs for a static geometry.

Where it pays was measured per conv shape (BENCHMARKS.md, "Halo tiles for full convs", "Gather-GEMM
backward"): output blocks of 4x4 and more at stride 1 (stages 1 and 2) and 8x8 and more at stride 2 (the
stem) beat the gather-GEMM; smaller blocks lose (oneDNN on tiny maps, whose strided backward is slow),
so ``choose_conv_tile`` only takes blocks of at least ``TILE_MIN_SIDE`` x stride output sites a side.
ResNet's 3x3 stride-2 max pool runs over the same tiles (``tile_max_pool``: oneDNN's pool instead of a
max over gathered 3x3 windows, 3x faster on CPU).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..rows import _pad_rows
from .scatter import _pad_row, window_rows
from .tiles import occupied_tile_origins

if TYPE_CHECKING:
    from .geometry import PackedGeometry

# Tiles only where an output block is at least this many sites a side times the stride: at stride 1 4x4
# blocks are 10 % faster than the gather-GEMM and 8x8 1.5x; at stride 2 4x4 blocks tie (56 -> 28) and 2x2
# lose 1.5x, 16x16 (the stem) win 1.8x (ResNet-50 shapes on CPU, 1 and 2 threads, BENCHMARKS.md).
TILE_MIN_SIDE = 4
# A general (non-static) geometry takes the largest block size whose occupied tiles are at least this
# full: patch-aligned masks fill their patches completely, scattered sites fill nothing.
TILE_MIN_FILL = 0.75


def choose_conv_tile(g_out: "PackedGeometry", stride: int, min_side: int | None = None) -> int | None:
    """Output block size s for ``tile_conv`` at this output geometry, or None (use the gather-GEMM):
    blocks of at least ``min_side`` (default ``TILE_MIN_SIDE * stride``) sites a side that are (nearly)
    full."""
    min_side = TILE_MIN_SIDE * stride if min_side is None else max(min_side, 2)
    if g_out.num_rows == 0:
        return None
    if g_out.static:  # the promised blocks are whole tiles: no count, no sync
        s = g_out.block
        return s if s >= min_side else None

    def fill(s):
        return g_out.num_rows / (g_out.tiles(s, s)[2] * s * s)

    key = ("conv_tile", min_side)
    if key not in g_out._cache:
        h, w = g_out.spatial_shape
        sizes = [s for s in (16, 8, 4, 2) if s <= max(h, w) and s >= min_side]
        g_out._cache[key] = next((s for s in sizes if fill(s) >= TILE_MIN_FILL), None)
    return g_out._cache[key]


def conv_tile_index(g_in: "PackedGeometry", g_out: "PackedGeometry", s: int, k: int, stride: int,
                    padding: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(in_idx [P*t*t], out_pos [M], P, t), cached on ``g_out``: ``in_idx`` the input row at each tile
    input position (N = zero), ``out_pos`` each output row's position in the [P, s, s] tile outputs,
    t = (s - 1) * stride + k the tile input side."""
    def build():
        t = (s - 1) * stride + k
        tid, rank, p = g_out.tiles(s, s)
        _, y, x = g_out.bxy()
        out_pos = (rank[tid] * s + y % s) * s + x % s
        tb, ty, tx = occupied_tile_origins(g_out, s, s)
        rows = window_rows(g_in.dense_to_row(), g_in.spatial_shape, g_in.num_rows, tb, ty * stride - padding,
                           tx * stride - padding, t, t)
        return rows.reshape(-1), out_pos, p, t
    return g_out.cached(("tconv", s, k, stride, padding), build)


def tile_conv(feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, index,
              stride: int) -> torch.Tensor:
    """[M, C_out] = the conv at the output rows, from the input rows ``feats`` [N, C_in] and
    ``conv_tile_index``'s tables."""
    x = _tile_inputs(_pad_row(feats), index)
    y = F.conv2d(x, weight.to(feats.dtype), None if bias is None else bias.to(feats.dtype), stride=stride)
    return _tile_outputs(y, index)


def tile_max_pool(feats: torch.Tensor, index, kernel: int, stride: int) -> torch.Tensor:
    """[M, C]: the max over each output row's window of active input rows, 0 where the window has none,
    from ``conv_tile_index``'s tables (k = ``kernel``). Inactive sites read the dtype's lowest finite value,
    not -inf, so an all-inactive window is found by its value and the pool's backward never meets -inf."""
    lowest = torch.finfo(feats.dtype).min
    rows = _tile_outputs(F.max_pool2d(_tile_inputs(_pad_rows(feats, lowest), index), kernel, stride), index)
    return rows.masked_fill(rows == lowest, 0.0)


def _tile_inputs(padded_rows: torch.Tensor, index) -> torch.Tensor:
    """[P, C, t, t] (channels-last memory): the tile inputs read from the rows with their fill row
    appended (index N), at ``conv_tile_index``'s ``in_idx``."""
    in_idx, _, p, t = index
    return padded_rows.index_select(0, in_idx).view(p, t, t, padded_rows.shape[1]).permute(0, 3, 1, 2)


def _tile_outputs(y: torch.Tensor, index) -> torch.Tensor:
    """[M, C]: the output rows read back from the tiles' outputs [P, C, s, s] at ``out_pos``."""
    return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1]).index_select(0, index[1])
