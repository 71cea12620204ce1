"""Masked-dense backend: plain torch on full maps, zeroing inactive sites after every op.

It computes everything (the cost of a dense network) but needs no library, runs anywhere, and is
the numerical reference the other backends are tested against: zeroing inactive sites before a
convolution and after it gives exactly a submanifold sparse convolution at the active sites.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
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
        # -inf at inactive sites (and in max_pool2d's padding): only active sites can win
        x = t.x_bchw.masked_fill(~t.active_bhw.unsqueeze(1), float("-inf"))
        out = F.max_pool2d(x, kernel, stride, padding=kernel // 2)
        out = out.masked_fill(out == float("-inf"), 0.0)  # windows without an active site
        return MaskedDense(out, active_out_bhw, t.stride * stride).masked(out)

    def map_rows(self, t, fn):
        # gather the active sites' rows, apply fn, scatter the result back (zeros elsewhere)
        x = t.x_bchw.permute(0, 2, 3, 1)
        batch_n = t.active_bhw.nonzero()[:, 0]
        rows = fn(x[t.active_bhw], batch_n)
        out = rows.new_zeros(*x.shape[:3], rows.shape[1]).index_put((t.active_bhw,), rows)
        return MaskedDense(out.permute(0, 3, 1, 2), t.active_bhw, t.stride)

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
