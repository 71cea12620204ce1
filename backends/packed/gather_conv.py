"""k x k convolutions at sparse cost (ResNet's 3x3s, 7x7 stem, strided 3x3 and 1x1): a gather-GEMM over
the rows. For every output row the k*k rows of its window (a zero row where a tap is inactive or
outside the map) are gathered into one [M, k*k*C_in] matrix, and one matmul with the weight gives the
outputs: compute and memory scale with the active sites, not the map.

The window tables (windows.py) are index tensors the geometry caches: ``win`` [M, K] (input row at tap o
of output row m; N = none) and its inverse ``inv`` [N, K] (the slot m*K + o of the window matrix where
input row i sits at tap o; M*K = none). Backward is matmuls and gathers, no scatter-add: the window
matrix's gradient is grad_out @ W, and each input row sums its K slots of it listed in ``inv`` (only
the M*K slots that exist are multiplied: a stride-2 conv's transposed conv would be 3/4 zero rows). The
weight gradient is grad_out^T @ the window matrix, gathered again rather than saved (K times the input's
memory). Both tables are built without host syncs for a static geometry, so the same function serves
static mode under ``torch.compile``.

Two layouts of the window matrix, the same numbers: taps-major (o, C_in) when there are more output rows
than output channels, so the weight is laid out (C_out, kh, kw, C_in) once per call; channels-major
(C_in, o) otherwise, the weight's own memory, so a small-M conv (ResNet's stage 4: 80 rows, 2.4M weights
at B 4) transposes its few windows instead of its large weight (BENCHMARKS.md, "Gather-GEMM backward").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .scatter import _pad_row


def _window_matrix(feats: torch.Tensor, win: torch.Tensor, channels_major: bool) -> torch.Tensor:
    """[M, K*C_in]: the rows at each window's taps (a zero row for N), (o, c) or (c, o) per row."""
    m, kk = win.shape
    windows = _pad_row(feats).index_select(0, win.reshape(-1)).view(m, kk, feats.shape[1])
    return (windows.transpose(1, 2) if channels_major else windows).reshape(m, kk * feats.shape[1])


def _weight_matrix(weight: torch.Tensor, dtype: torch.dtype, channels_major: bool) -> torch.Tensor:
    """[C_out, K*C_in] in the window matrix's layout: a view of the weight, or its (kh, kw, C_in) copy."""
    w = weight.to(dtype)
    return w.reshape(w.shape[0], -1) if channels_major else w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)


def _sum_slots(slots: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """[N, C]: each input row's sum of the window-matrix slots ``inv`` [N, K] lists (M*K = none), in one
    embedding_bag: no zero row appended to ``slots`` and no [N, K, C] intermediate (10x faster at
    ResNet-50's stage 3 than pad, gather and sum)."""
    if slots.shape[0] == 0:  # no output rows: nothing reads the inputs
        return slots.new_zeros(inv.shape[0], slots.shape[1])
    present = inv < slots.shape[0]
    return F.embedding_bag(inv.masked_fill(~present, 0), slots, per_sample_weights=present.to(slots.dtype),
                           mode="sum")


class _GatherConv(torch.autograd.Function):
    """out [M, C_out] = windows(feats) @ W^T (+ bias); see the module docstring. Index tensors are
    arguments, so dynamo traces it into a compiled step."""

    @staticmethod
    def forward(ctx, feats, weight, bias, win, inv):
        channels_major = win.shape[0] < weight.shape[0]
        w_mat = _weight_matrix(weight, feats.dtype, channels_major)
        out = F.linear(_window_matrix(feats, win, channels_major), w_mat,
                       None if bias is None else bias.to(feats.dtype))
        ctx.save_for_backward(feats, w_mat, win, inv)
        ctx.channels_major, ctx.weight_shape, ctx.weight_dtype = channels_major, weight.shape, weight.dtype
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        feats, w_mat, win, inv = ctx.saved_tensors
        need_in, need_w, need_b = ctx.needs_input_grad[:3]
        m, kk = win.shape
        c_out, c_in, kh, kw = ctx.weight_shape
        g = grad_out.to(feats.dtype).contiguous()
        grad_feats = grad_w = grad_b = None
        if need_in:
            grad_win = g @ w_mat                                               # [M, K*C_in]
            if ctx.channels_major:
                grad_win = grad_win.view(m, c_in, kk).transpose(1, 2)
            grad_feats = _sum_slots(grad_win.reshape(m * kk, c_in), inv)
        if need_w:
            gw = g.t() @ _window_matrix(feats, win, ctx.channels_major)        # [C_out, K*C_in]
            gw = gw.view(ctx.weight_shape) if ctx.channels_major else (
                gw.view(c_out, kh, kw, c_in).permute(0, 3, 1, 2).contiguous())
            grad_w = gw.to(ctx.weight_dtype)
        if need_b and ctx.has_bias:
            grad_b = g.sum(0).to(ctx.weight_dtype)
        return grad_feats, grad_w, grad_b, None, None


def gather_conv(feats, weight, bias, win, inv) -> torch.Tensor:
    return _GatherConv.apply(feats, weight, bias, win, inv)
