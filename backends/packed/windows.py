"""Window tables of k x k convs and max pools over packed rows, cached on the geometries: for each output
row the input rows of its k x k window (``win``) and the inverse (``inv``), and the output geometry of a
strided op at the sites the caller gives. Static geometries build all of it without host syncs: a
strided op's output sites are then the geometry's own downsampling (``PackedGeometry.down``: the next
stage's whole patches), checked against the caller's mask on the device."""
from __future__ import annotations

import torch

from .geometry import PackedGeometry
from .scatter import window_rows


def output_geometry(g: PackedGeometry, stride: int, active_out_bhw: torch.Tensor) -> PackedGeometry:
    """The geometry of ``active_out_bhw`` at ``g.stride * stride`` (one object per mask and stride, so a
    block's strided conv and its shortcut share it and its window tables)."""
    if not g.static:
        return g.cached(("out", stride, active_out_bhw),
                        lambda: PackedGeometry.from_mask(active_out_bhw, g.stride * stride))
    out = g if stride == 1 else g.down(stride)[0]
    if tuple(active_out_bhw.shape) != (out.batch_size, *out.spatial_shape):
        raise ValueError(f"static packed geometry: output mask {tuple(active_out_bhw.shape)} is not the "
                         f"{out.spatial_shape} grid of a stride-{stride} op; pass num_visible=None")
    torch._assert_async((out.active_mask() == active_out_bhw).all(),
                        "static packed geometry: the output sites of a strided op must be the next stage's "
                        "patches; pass num_visible=None for other output masks")
    return out


def windows(g_in: PackedGeometry, g_out: PackedGeometry, k: int, stride: int, padding: int,
            inverse: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(win [M, k*k], inv [N, k*k] or None) from ``g_in``'s rows to ``g_out``'s, cached on ``g_out`` (whose
    input geometry at a given stride is unique: itself at stride 1, its parent stage otherwise). ``inverse``:
    only the input gradient needs ``inv`` (not the stem, whose input is the image)."""
    win = g_out.cached(("win", k, stride, padding), lambda: window_index(
        g_in.dense_to_row(), (g_in.batch_size, *g_in.spatial_shape), g_in.num_rows, g_out.bxy(), k, stride, padding))
    if not inverse:
        return win, None
    return win, g_out.cached(("inv", k, stride, padding), lambda: inverse_window_index(win, g_in.num_rows))


def window_index(dense_to_row: torch.Tensor, dims: tuple[int, int, int], n: int, out_bxy, k: int, stride: int,
                 padding: int) -> torch.Tensor:
    """int64 [M, k*k]: the input row at tap (dy, dx) (index dy * k + dx) of the window of each output site
    (b, i, j), i.e. input site (stride*i + dy - padding, stride*j + dx - padding); ``n`` where that site
    is inactive or outside the [B, H, W] map ``dims``. ``dense_to_row``: int64 [B*H*W], ``n`` = inactive."""
    ob, oy, ox = out_bxy
    rows = window_rows(dense_to_row, dims[1:], n, ob, oy * stride - padding, ox * stride - padding, k, k)
    return rows.view(-1, k * k)


def inverse_window_index(win: torch.Tensor, n: int) -> torch.Tensor:
    """int64 [N, K]: for input row i and tap o, the slot m*K + o of the window matrix of the output row m
    whose window reads i at tap o, M*K where none does (one at most: a tap maps input sites to output
    sites one to one). Row n (the missing taps) receives many writes and is dropped."""
    m, kk = win.shape
    slots = win * kk + torch.arange(kk, device=win.device)
    inv = torch.full(((n + 1) * kk,), m * kk, dtype=torch.int64, device=win.device)
    inv = inv.index_copy(0, slots.reshape(-1), torch.arange(m * kk, device=win.device))
    return inv.view(n + 1, kk)[:n]
