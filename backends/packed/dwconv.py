"""Stride-1 submanifold depthwise convs over packed rows, as autograd functions: over halo tiles
(``_TileDWConv``; static mode ``_StaticTileDWConv``) or, where tiles do not pay, over a dense
channels-last map (static mode ``_StaticDWConv``; general mode uses subm_conv's ``_SubmConv``). Their
backwards are written out: the input gradient is the same conv with the flipped kernel (input and
output sites are equal), the weight gradient a conv of the inputs with the output gradients as kernels."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .geometry import PackedGeometry
from .scatter import _gather_static, _pad_row, _scatter_static
from .subm_conv import _SubmConv
from .tiles import TilePlan, _per_plane_weight_grad, _tile_inputs, _tiles_conv, _tiles_weight_grad


class _StaticDWConv(torch.autograd.Function):
    """Stride-1 submanifold depthwise conv for static mode: rows -> zero [B, H, W, C] map -> dense
    channels-last conv -> rows, with its backward written out (dynamo traces it, inductor fuses the
    scatters and gathers around the convs). Left to AOTAutograd, inductor on CPU turned the gather's
    backward into an atomic scatter-add and fed convolution_backward an NCHW gradient and an odd
    [B, H, C, W] input: the step's depthwise backward took 4-6x the eager time (BENCHMARKS.md). Here
    the gradient is scattered with index_copy (each row has one site), the input gradient is the
    same channels-last conv with the flipped kernel (input and output sites are equal), and only the
    weight gradient uses convolution_backward, on channels-last views."""

    @staticmethod
    def forward(ctx, feats, weight, bias, flat, dims: tuple[int, int, int]):
        c = feats.shape[1]
        pad = (weight.shape[-2] // 2, weight.shape[-1] // 2)
        x = _scatter_static(feats, flat, dims)
        y = F.conv2d(x, weight.to(feats.dtype), None if bias is None else bias.to(feats.dtype), padding=pad, groups=c)
        ctx.save_for_backward(feats, weight, flat)
        ctx.dims, ctx.pad, ctx.has_bias = dims, pad, bias is not None
        return _gather_static(y, flat)

    @staticmethod
    def backward(ctx, grad_out):
        feats, weight, flat = ctx.saved_tensors
        need_in, need_w, need_b = ctx.needs_input_grad[:3]
        c, w = feats.shape[1], weight.to(feats.dtype)
        grad_out = grad_out.to(feats.dtype)
        g = _scatter_static(grad_out, flat, ctx.dims)
        grad_feats = grad_w = grad_b = None
        if need_in:
            grad_feats = _gather_static(F.conv2d(g, w.flip(-2, -1), None, padding=ctx.pad, groups=c), flat)
        if need_w and feats.device.type == "cpu":
            grad_w = _planes_weight_grad(feats, grad_out, flat, ctx.dims, weight.shape[-2:]).to(weight.dtype)
        elif need_w:  # cuDNN has a real depthwise weight gradient; a 56x56 "kernel" per plane is untested there
            grad_w = torch.ops.aten.convolution_backward(
                g, _scatter_static(feats, flat, ctx.dims), w, None, [1, 1], list(ctx.pad), [1, 1], False, [0, 0],
                c, [False, True, False])[1].to(weight.dtype)
        if need_b and ctx.has_bias:
            grad_b = grad_out.float().sum(0).to(weight.dtype)
        return grad_feats, grad_w, grad_b, None, None


def _planes_weight_grad(feats, grad_out, flat, dims, kernel) -> torch.Tensor:
    """Depthwise weight gradient [C, 1, kh, kw] as one conv with B*C groups: each (channel, sample)
    plane of the zero-padded input, written (c, b, y, x) straight from the rows, convolved with that
    plane of the output gradient as its kernel, then summed over samples (TilePlan's scatter mode).
    On CPU 2-3x faster than oneDNN's depthwise weight gradient (convolution_backward) at
    28x28 and smaller maps, about equal at 56x56."""
    b, h, w = dims
    kh, kw = kernel
    ph, pw = kh // 2, kw // 2
    th, tw = h + 2 * ph, w + 2 * pw
    c = feats.shape[1]
    s = torch.div(flat, h * w, rounding_mode="floor")
    y = torch.div(flat - s * (h * w), w, rounding_mode="floor")
    x = flat - s * (h * w) - y * w
    in_pos = (s * th + y + ph) * tw + x + pw
    x_planes = feats.new_zeros(c, b * th * tw).index_copy(1, in_pos, feats.t())
    g_planes = feats.new_zeros(c, b * h * w).index_copy(1, flat, grad_out.t())
    return _per_plane_weight_grad(x_planes, g_planes, b, (th, tw), (h, w), kernel)


class _StaticTileDWConv(torch.autograd.Function):
    """Static mode's halo-tile depthwise conv (a static geometry's TilePlan): the gather-mode tile conv with
    its index tensors passed in, so dynamo traces it into the step's graph. Saves the rows, not the
    tile inputs (3x the rows at 8x8 tiles): the backward gathers them again."""

    @staticmethod
    def forward(ctx, feats, weight, bias, in_idx, int_idx, out_idx, layout):
        w = weight.to(feats.dtype)
        out, _ = _tiles_conv(_pad_row(feats), w, None if bias is None else bias.to(feats.dtype), in_idx, out_idx,
                             layout[:4])
        ctx.save_for_backward(feats, weight, in_idx, int_idx, out_idx)
        ctx.layout, ctx.has_bias = layout, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        feats, weight, in_idx, int_idx, out_idx = ctx.saved_tensors
        nchunk, th, tw, ch, sh, sw = ctx.layout
        need_in, need_w, need_b = ctx.needs_input_grad[:3]
        w = weight.to(feats.dtype)
        g = _pad_row(grad_out.to(feats.dtype))
        grad_feats = grad_w = grad_b = None
        if need_in:
            grad_feats = _tiles_conv(g, w.flip(-2, -1), None, in_idx, out_idx, (nchunk, th, tw, ch))[0]
        if need_w:
            x_tiles = _tile_inputs(_pad_row(feats), in_idx, (nchunk, th, tw, ch))
            grad_w = _tiles_weight_grad(g, x_tiles, int_idx, (nchunk, sh, sw, ch), *weight.shape[-2:]).to(weight.dtype)
        if need_b and ctx.has_bias:
            grad_b = grad_out.float().sum(0).to(weight.dtype)
        return grad_feats, grad_w, grad_b, None, None, None, None


class _TileDWConv(torch.autograd.Function):
    """Submanifold depthwise conv over halo tiles (see TilePlan). Backward: the input gradient is
    the same tiled conv of the output gradient with the flipped kernel (input and output active
    sets are equal); the weight gradient, per chunk, is a depthwise conv of the input tiles with the
    output-gradient tiles as kernel."""

    @staticmethod
    def forward(ctx, feats, weight, bias, plan: TilePlan, geom: PackedGeometry):
        ctx.geom = geom
        w = weight.to(feats.dtype)
        out, x_tiles = plan.conv(plan.prepare(feats), w, None if bias is None else bias.to(feats.dtype),
                                 "x", ctx.geom)
        ctx.plan = plan
        ctx.has_bias = bias is not None
        # gather mode: keep the gathered tile inputs for the weight gradient (no second gather);
        # scatter mode: the rows, written again into the scratch buffer in backward
        ctx.save_for_backward(feats, weight, x_tiles)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        src, weight, x_tiles = ctx.saved_tensors
        plan = ctx.plan
        need_in, need_w, need_b = ctx.needs_input_grad[:3]
        grad_feats = grad_w = grad_b = None
        w = weight.to(src.dtype)
        g = plan.prepare(grad_out.to(src.dtype).contiguous())
        if need_in:
            grad_feats = plan.conv(g, w.flip(-2, -1), None, "g", ctx.geom)[0]
        if need_w:
            grad_w = plan.weight_grad(src, g, *weight.shape[-2:], x_tiles).to(weight.dtype)
        if need_b and ctx.has_bias:
            grad_b = grad_out.sum(0)
        return grad_feats, grad_w, grad_b, None, None


def depthwise(feats, weight, bias, geom: PackedGeometry, tile: tuple[int, int] | None, chunk_floats: int):
    """Stride-1 submanifold depthwise conv of the rows over ``tile``-sized halo tiles or, None, the dense map."""
    kh, kw = weight.shape[-2:]
    plan = None if tile is None else geom.tile_plan(*tile, kh, kw, feats.shape[1], chunk_floats)
    if geom.static and plan is None:
        return _StaticDWConv.apply(feats, weight, bias, geom.flat, (geom.batch_size, *geom.spatial_shape))
    if geom.static:
        layout = (plan.nchunk, plan.th, plan.tw, plan.ch, plan.sh, plan.sw)
        return _StaticTileDWConv.apply(feats, weight, bias, plan.in_idx, plan.int_idx, plan.out_idx, layout)
    if plan is None:
        return _SubmConv.apply(feats, weight, bias, geom, feats.shape[1])
    return _TileDWConv.apply(feats, weight, bias, plan, geom)
