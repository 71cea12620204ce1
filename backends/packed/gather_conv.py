"""k x k convolutions at sparse cost (ResNet's 3x3s, 7x7 stem, strided 3x3 and 1x1): a gather-GEMM over
the rows. For every output row the k*k rows of its window (a zero row where a tap is inactive or
outside the map) are gathered into one [M, k*k*C_in] matrix, and one matmul with the weight laid out
(kh, kw, C_in) gives the outputs: compute and memory scale with the active sites, not the map.

The window tables (windows.py) are index tensors the geometry caches: ``win`` [M, K] (input row at tap o
of output row m; N = none) and its inverse ``inv`` [N, K] (the output row that reads input row i at tap
o; M = none). Backward is gathers and matmuls only, no scatter-add: the input gradient is the transposed
conv, the grad_out rows gathered at ``inv`` times the weight laid out (kh, kw, C_out); the weight gradient is grad_out^T @ the window matrix, gathered again
rather than saved (K times the input's memory). Both tables are built without host syncs for a static
geometry, so the same function serves static mode under ``torch.compile``. The k*k windows (9x the input for a 3x3)
are the price; chosen over the dense map by measurement (BENCHMARKS.md, "ResNet-50 on the packed backend").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .scatter import _pad_row


def _weight_matrix(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[C_out, C_in, kh, kw] -> [C_out, kh*kw*C_in], the layout of the gathered windows."""
    return weight.to(dtype).permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def _windows(feats: torch.Tensor, win: torch.Tensor) -> torch.Tensor:
    """[M, K*C]: the rows at each window's taps (a zero row for N)."""
    return _pad_row(feats).index_select(0, win.reshape(-1)).view(win.shape[0], win.shape[1] * feats.shape[1])


class _GatherConv(torch.autograd.Function):
    """out [M, C_out] = windows(feats) @ W^T (+ bias); see the module docstring. Index tensors are
    arguments, so dynamo traces it into a compiled step."""

    @staticmethod
    def forward(ctx, feats, weight, bias, win, inv):
        w_mat = _weight_matrix(weight, feats.dtype)
        out = F.linear(_windows(feats, win), w_mat, None if bias is None else bias.to(feats.dtype))
        # the weight matrix is kept for the input gradient: its (tap, C_out, C_in) layout is a copy of
        # contiguous C_in rows from it, where the weight itself would need a strided gather
        ctx.save_for_backward(feats, weight, w_mat, win, inv)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        feats, weight, w_mat, win, inv = ctx.saved_tensors
        need_in, need_w, need_b = ctx.needs_input_grad[:3]
        g = grad_out.to(feats.dtype).contiguous()
        grad_feats = grad_w = grad_b = None
        if need_in:  # the transposed conv: each input row gathers the output rows that read it
            c_out, c_in = weight.shape[:2]
            w_t = w_mat.view(c_out, -1, c_in).transpose(0, 1).reshape(-1, c_in)  # [K*C_out, C_in]
            grad_feats = _windows(g, inv) @ w_t
        if need_w:
            gw = g.t() @ _windows(feats, win)                                  # [C_out, K*C_in]
            kh, kw = weight.shape[-2:]
            grad_w = gw.view(weight.shape[0], kh, kw, -1).permute(0, 3, 1, 2).to(weight.dtype)
        if need_b and ctx.has_bias:
            grad_b = g.sum(0).to(weight.dtype)
        return grad_feats, grad_w, grad_b, None, None


def gather_conv(feats, weight, bias, win, inv) -> torch.Tensor:
    return _GatherConv.apply(feats, weight, bias, win, inv)
