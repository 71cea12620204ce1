"""Masked-dense backend: plain torch on full maps, zeroing inactive sites after every op.

It computes everything (the cost of a dense network) but needs no library, runs anywhere, and is
the numerical reference the other backends are tested against: zeroing inactive sites before a
convolution and after it gives exactly a submanifold sparse convolution at the active sites.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mimsparse.sparse import SparseBatch

from .base import Backend
from .checks import check_conv_weight, check_strided_conv, check_window_op, sites_reached
from .rows import scale_rows


@dataclass
class MaskedDense:
    """x_bchw: features, zero at inactive sites; active_bhw: bool [B, H, W]; stride: image px per site."""

    x_bchw: torch.Tensor
    active_bhw: torch.Tensor
    stride: int = 1

    def masked(self, x_bchw: torch.Tensor) -> "MaskedDense":
        return MaskedDense(x_bchw * self.active_bhw.unsqueeze(1).to(x_bchw.dtype), self.active_bhw, self.stride)


class MaskedDenseBackend(Backend):
    name = "dense"

    def from_sparse(self, sb: SparseBatch) -> MaskedDense:
        sb.validate()  # to_dense would silently merge duplicates and fail on bounds
        return self.from_dense(sb.to_dense(), sb.active_mask(), sb.stride)

    def from_dense(self, x_bchw, active_bhw, stride=1, rows_per_sample=None, block=1):
        # channels_last: convs keep it, and per-site ops then see contiguous [..., C] rows
        # (faster on CPU than NCHW: BENCHMARKS.md, "Depthwise 7×7 on sparse rows").
        x_bchw = x_bchw.contiguous(memory_format=torch.channels_last)
        return MaskedDense(x_bchw, active_bhw, stride).masked(x_bchw)

    def to_sparse(self, t: MaskedDense) -> SparseBatch:
        return SparseBatch.from_dense(t.x_bchw, t.active_bhw, t.stride)

    def to_dense(self, t: MaskedDense) -> torch.Tensor:
        return t.x_bchw

    def conv(self, t, weight, bias):
        check_conv_weight(weight, t.x_bchw.shape[1], "conv")
        return t.masked(F.conv2d(t.x_bchw, weight, bias, padding=weight.shape[-1] // 2))

    def dwconv(self, t, weight, bias):
        check_conv_weight(weight, t.x_bchw.shape[1], "dwconv", depthwise=True)
        return t.masked(F.conv2d(t.x_bchw, weight, bias, padding=weight.shape[-1] // 2, groups=t.x_bchw.shape[1]))

    def strided_conv(self, t, weight, bias, stride, *, padding, active_out_bhw=None):
        k, _ = check_strided_conv(weight, t.x_bchw.shape[1], stride, padding, t.x_bchw.shape[0], t.x_bchw.shape[2:],
                                  active_out_bhw)
        if active_out_bhw is None:
            active_out_bhw = sites_reached(t.active_bhw, k, stride, padding)
        out = F.conv2d(t.x_bchw, weight, bias, stride=stride, padding=padding)
        return MaskedDense(out, active_out_bhw, t.stride * stride).masked(out)

    def max_pool(self, t, kernel, stride, active_out_bhw):
        check_window_op("max_pool", kernel, stride, t.x_bchw.shape[0], t.x_bchw.shape[2:], active_out_bhw)
        # The lowest finite value at inactive sites (max_pool2d pads with -inf): only active sites can win.
        # Not -inf: a window with no active site would tie with its padding, and inductor's compiled
        # backward then routes the gradient to a padding position (an out-of-bounds index).
        low = torch.finfo(t.x_bchw.dtype).min
        x = t.x_bchw.masked_fill(~t.active_bhw.unsqueeze(1), low)
        out = F.max_pool2d(x, kernel, stride, padding=kernel // 2)
        out = out.masked_fill(out == low, 0.0)  # windows without an active site
        return MaskedDense(out, active_out_bhw, t.stride * stride).masked(out)

    def map_rows(self, t, fn):
        # gather the active sites' rows, apply fn, scatter the result back (zeros elsewhere)
        x = t.x_bchw.permute(0, 2, 3, 1)
        batch_n = t.active_bhw.nonzero()[:, 0]
        rows = fn(x[t.active_bhw], batch_n)
        out = rows.new_zeros(*x.shape[:3], rows.shape[1]).index_put((t.active_bhw,), rows)
        return MaskedDense(out.permute(0, 3, 1, 2), t.active_bhw, t.stride)

    def batch_norm(self, t, bn):
        # map_rows gathers the active rows through nonzero: on a GPU a host sync in every BatchNorm (all
        # of a ResNet's). Masked sums give the same statistics without one. SyncBatchNorm keeps its own.
        if type(bn) is not nn.BatchNorm2d:
            return super().batch_norm(t, bn)
        return MaskedDense(masked_batch_norm(t.x_bchw, t.active_bhw, bn), t.active_bhw, t.stride)

    def batch_size(self, t):
        return t.x_bchw.shape[0]

    def map_feats(self, t, fn):
        return t.masked(fn(t.x_bchw.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))

    def sample_l2_norm(self, t):
        # Inactive sites are zero, so the norm over the whole map is the norm over the active sites.
        return torch.linalg.vector_norm(t.x_bchw.float(), ord=2, dim=(2, 3))

    def add(self, a, b):
        return MaskedDense(a.x_bchw + b.x_bchw, a.active_bhw, a.stride)

    def scale_samples(self, t, scale, shift=None):
        b, c = t.x_bchw.shape[:2]
        shift = None if shift is None else shift.view(1, c, 1, 1)
        out = MaskedDense(scale_rows(t.x_bchw, scale.view(b, -1, 1, 1), shift), t.active_bhw, t.stride)
        return out if shift is None else out.masked(out.x_bchw)  # the shift only at active sites


def masked_batch_norm(x_bchw: torch.Tensor, active_bhw: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """``bn`` (an nn.BatchNorm2d) over the active sites of ``x_bchw`` (zero elsewhere), with the mask as a
    multiplier instead of a gather: same statistics and running-statistics update as ``bn`` on the
    active rows, no host sync. Statistics in float32 at least; returns x's dtype, zero at inactive sites."""
    x = x_bchw.to(torch.promote_types(x_bchw.dtype, torch.float32))
    mask = active_bhw.unsqueeze(1).to(x.dtype)
    if bn.training or bn.running_mean is None:
        n = mask.sum()
        mean = x.sum((0, 2, 3)) / n.clamp_min(1)  # inactive sites are zero
        var = ((x - mean.view(1, -1, 1, 1)) * mask).square().sum((0, 2, 3)) / n.clamp_min(1)
        if bn.training and bn.track_running_stats:
            _update_running_stats(bn, mean.detach(), var.detach(), n)
    else:
        mean, var = bn.running_mean, bn.running_var
    scale = torch.rsqrt(var + bn.eps)
    shift = -mean * scale
    if bn.affine:
        scale, shift = scale * bn.weight, torch.addcmul(bn.bias, shift, bn.weight)
    return ((x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)) * mask).to(x_bchw.dtype)


@torch.no_grad()
def _update_running_stats(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
    """nn.BatchNorm2d's update (momentum, or the cumulative average when it is None; unbiased variance),
    checked and skipped on the device: one active site is the error bn raises, none leaves the
    statistics as they are (bn counts the batch either way)."""
    torch._assert_async(n != 1, "BatchNorm in training needs more than 1 active site in the batch")
    bn.num_batches_tracked.add_(1)
    m = bn.momentum if bn.momentum is not None else 1.0 / bn.num_batches_tracked
    some = n > 0
    bn.running_mean.copy_(torch.where(some, (1 - m) * bn.running_mean + m * mean, bn.running_mean))
    unbiased = var * n / (n - 1).clamp_min(1)
    bn.running_var.copy_(torch.where(some, (1 - m) * bn.running_var + m * unbiased, bn.running_var))
