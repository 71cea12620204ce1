"""Full-channel (and grouped) stride-1 submanifold convs over packed rows: the output sites are the
input sites. General mode writes the rows into the geometry's cached dense scratch buffer, runs a dense
conv and reads the active sites back (backward on the same buffers); static mode is the same data path
in plain differentiable torch, so AOTAutograd derives its backward."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .geometry import PackedGeometry
from .scatter import _scatter_static


class _SubmConv(torch.autograd.Function):
    """Stride-1 k x k submanifold conv (any groups) through a dense channels-last scratch buffer."""

    @staticmethod
    def forward(ctx, feats, weight, bias, geom: PackedGeometry, groups: int):
        pad = [weight.shape[-2] // 2, weight.shape[-1] // 2]
        w = weight.to(feats.dtype)
        x = geom.scatter(feats, "x")
        y = F.conv2d(x, w, None, padding=pad, groups=groups)
        out = geom.gather(y)
        if bias is not None:
            out += bias.to(out.dtype)
        ctx.geom, ctx.groups, ctx.pad = geom, groups, pad
        ctx.has_bias = bias is not None
        ctx.save_for_backward(feats, weight)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        feats, weight = ctx.saved_tensors
        geom, groups, pad = ctx.geom, ctx.groups, ctx.pad
        need_in, need_w, need_b = ctx.needs_input_grad[:3]
        grad_feats = grad_w = grad_b = None
        grad_out = grad_out.to(feats.dtype).contiguous()
        if need_in or need_w:
            w = weight.to(feats.dtype)
            g = geom.scatter(grad_out, "g")
            if need_w:
                x = geom.scatter(feats, "x")
                gi, gw, _ = torch.ops.aten.convolution_backward(
                    g, x, w, None, [1, 1], pad, [1, 1], False, [0, 0], groups, [need_in, True, False])
                grad_w = gw.to(weight.dtype)
            else:
                gi = F.conv_transpose2d(g, w, None, padding=pad, groups=groups)
            if need_in:
                grad_feats = geom.gather(gi)
        if need_b and ctx.has_bias:
            grad_b = grad_out.sum(0)
        return grad_feats, grad_w, grad_b, None, None


# ---- static mode: plain differentiable torch (AOTAutograd derives the backward, inductor fuses) ----
def _conv_static(feats, weight, bias, geom: PackedGeometry, groups: int) -> torch.Tensor:
    """Stride-1 submanifold conv: rows -> zero [B, H, W, C] map (channels-last) -> dense conv -> rows."""
    x = _scatter_static(feats, geom.flat, (geom.batch_size, *geom.spatial_shape))
    pad = (weight.shape[-2] // 2, weight.shape[-1] // 2)
    return geom.gather(F.conv2d(x, weight.to(feats.dtype), None if bias is None else bias.to(feats.dtype),
                                padding=pad, groups=groups))


def dense_map_conv(feats, weight, bias, geom: PackedGeometry) -> torch.Tensor:
    """Stride-1 k x k submanifold conv through the dense map: static mode's plain torch, else ``_SubmConv``."""
    if geom.static:
        return _conv_static(feats, weight, bias, geom, 1)
    return _SubmConv.apply(feats, weight, bias, geom, 1)
