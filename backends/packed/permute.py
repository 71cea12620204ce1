"""Row permutations with a gather for a gradient (the children gather of a downsampling)."""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


class _PermuteRows(torch.autograd.Function):
    """``out = src_padded[fwd_idx]`` where src_padded has a zero row appended at index N, and every
    source row is read at most once, so the gradient is again a gather:
    ``grad_src = grad_out_padded[bwd_idx]`` (bwd_idx = len(out) for rows nobody reads)."""

    @staticmethod
    def forward(ctx, src, fwd_idx, bwd_idx, fwd_pad: bool, bwd_pad: bool):
        ctx.save_for_backward(bwd_idx)
        ctx.bwd_pad = bwd_pad
        if fwd_pad:
            src = torch.cat([src, src.new_zeros(1, src.shape[1])])
        return src.index_select(0, fwd_idx)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (bwd_idx,) = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        if ctx.bwd_pad:
            grad_out = torch.cat([grad_out, grad_out.new_zeros(1, grad_out.shape[1])])
        return grad_out.index_select(0, bwd_idx), None, None, None, None
