"""What the backends whose native tensor is feature rows [N, C] plus a sample index per row
(packed, spconv, MinkowskiEngine) share: the per-site and per-sample ops, window gathers for strided
convs and max pooling, and the two depthwise-conv strategies."""
from __future__ import annotations

from abc import abstractmethod
from typing import Iterable

import torch
import torch.nn.functional as F

from mimsparse.sparse import SparseBatch

from .base import Backend, Native
from .checks import autocast_dtype, check_strided_conv, check_window_op, dtype_name, sites_reached


class RowBackend(Backend):
    """Shared per-site/per-sample ops for backends whose native tensor stores feature rows [N, C]
    plus a batch index per row (packed, spconv, MinkowskiEngine)."""

    @abstractmethod
    def feats(self, t: Native) -> torch.Tensor: ...

    @abstractmethod
    def batch_index(self, t: Native) -> torch.Tensor:
        """int64 [N]: the sample each row belongs to."""

    @abstractmethod
    def with_feats(self, t: Native, feats: torch.Tensor) -> Native:
        """Same sites, new feature rows."""

    def check_compute(self, feats: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Refuse dtypes the library cannot compute in (also when autocast would produce them), and
        weights on another device or, outside autocast, in another dtype."""
        dtype = autocast_dtype(feats.device) or feats.dtype
        self.check_dtype(dtype, feats.device)
        if weight is not None:
            if weight.device != feats.device:
                raise ValueError(f"weight on {weight.device} but features on {feats.device}")
            if autocast_dtype(feats.device) is None and weight.dtype != feats.dtype:
                raise TypeError(f"weight dtype {dtype_name(weight.dtype)} differs from the features' "
                                f"{dtype_name(feats.dtype)} (use autocast for mixed precision)")

    def map_feats(self, t, fn):
        return self.with_feats(t, fn(self.feats(t)))

    def sample_l2_norm(self, t):
        return per_sample_l2_norm(self.feats(t), self.batch_index(t), self.batch_size(t))

    def map_rows(self, t, fn):
        return self.with_feats(t, fn(self.feats(t), self.batch_index(t)))

    def strided_conv(self, t, weight, bias, stride, *, padding, active_out_bhw=None):
        """Gather the k x k window rows of every output site (a zero row for missing taps), one matmul."""
        sb = self.to_sparse(t)
        k, out_shape = check_strided_conv(weight, sb.num_channels, stride, padding, sb.batch_size, sb.spatial_shape,
                                          active_out_bhw)
        if active_out_bhw is None:
            active_out_bhw = sites_reached(sb.active_mask(), k, stride, padding)
        out_coords = active_out_bhw.nonzero().to(torch.int32)
        idx = window_rows(sb, out_coords, k, stride, padding)
        cols = _pad_rows(sb.feats, 0.0).index_select(0, idx.flatten()).view(idx.shape[0], -1)
        # cols are laid out (dy, dx, C_in): the weight's (kh, kw, C_in) flattened
        out = F.linear(cols, weight.permute(0, 2, 3, 1).flatten(1).to(cols.dtype), bias)
        return self.from_sparse(SparseBatch(out_coords, out, sb.batch_size, out_shape, sb.stride * stride))

    def max_pool(self, t, kernel, stride, active_out_bhw):
        """Gather the k x k window rows of every output site (-inf for missing taps), max over them."""
        sb = self.to_sparse(t)
        check_window_op("max_pool", kernel, stride, sb.batch_size, sb.spatial_shape, active_out_bhw)
        out_coords = active_out_bhw.nonzero().to(torch.int32)
        idx = window_rows(sb, out_coords, kernel, stride, kernel // 2)
        out = window_max(sb.feats, idx)
        return self.from_sparse(SparseBatch(out_coords, out, sb.batch_size, active_out_bhw.shape[1:],
                                            sb.stride * stride))

    def add(self, a, b):
        return self.with_feats(a, self.feats(a) + self.feats(b))

    def scale_samples(self, t, scale, shift=None):
        f = self.feats(t)
        # index_select: much faster backward on CPU than advanced indexing scale[batch]
        per_row = scale.reshape(scale.shape[0], -1).index_select(0, self.batch_index(t))
        return self.with_feats(t, scale_rows(f, per_row, shift))


def scale_rows(feats_nc: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
    """``feats * scale + shift`` (shapes broadcast against ``feats``) in the wider of the two dtypes, returned
    in the features' dtype: one rounding of the result, not of a float32 scale to bf16 first."""
    out = feats_nc * scale if shift is None else torch.addcmul(shift.to(scale.dtype), feats_nc, scale)
    return out.to(feats_nc.dtype)


def per_sample_l2_norm(feats_nc: torch.Tensor, batch_n: torch.Tensor, batch_size: int) -> torch.Tensor:
    """float32 [B, C]: L2 norm over each sample's rows, summed in float32."""
    sumsq = feats_nc.new_zeros(batch_size, feats_nc.shape[1], dtype=torch.float32)
    return sqrt_or_zero(sumsq.index_add(0, batch_n, feats_nc.float().square()))


def sqrt_or_zero(sumsq: torch.Tensor) -> torch.Tensor:
    """sqrt, with 0 and a zero gradient where ``sumsq`` is 0 (a sample without rows, an all-zero
    channel): a plain sqrt would give 0 * inf = NaN in backward, unlike torch.linalg.vector_norm."""
    positive = sumsq > 0
    return torch.where(positive, sumsq, torch.ones_like(sumsq)).sqrt() * positive


def window_rows(sb: SparseBatch, out_coords: torch.Tensor, k: int, stride: int, padding: int) -> torch.Tensor:
    """int64 [M, k*k]: the row of ``sb`` at tap (dy, dx) (index dy * k + dx) of the k x k window of
    each output site (b, i, j) in ``out_coords`` [M, 3], i.e. input site (stride*i + dy - padding,
    stride*j + dx - padding); N = number of rows where that site is outside the map or inactive."""
    h, w = sb.spatial_shape
    n = sb.feats.shape[0]
    dev = sb.coords.device
    b, y, x = sb.coords.long().unbind(1)
    dense_to_row = torch.full((sb.batch_size * h * w,), n, dtype=torch.int64, device=dev)
    dense_to_row[(b * h + y) * w + x] = torch.arange(n, device=dev)
    ob, oy, ox = out_coords.long().unbind(1)
    taps = torch.arange(k, device=dev) - padding
    iy, ix = oy[:, None] * stride + taps, ox[:, None] * stride + taps           # [M, k] each
    inside = ((iy >= 0) & (iy < h))[:, :, None] & ((ix >= 0) & (ix < w))[:, None, :]
    pos = (ob[:, None, None] * h + iy.clamp(0, h - 1)[:, :, None]) * w + ix.clamp(0, w - 1)[:, None, :]
    return torch.where(inside, dense_to_row[pos], n).view(-1, k * k)


def window_max(feats_nc: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[M, C]: per output row, the max over the rows ``idx`` [M, K] of ``feats_nc`` (index N =
    missing); 0 where a window has no row at all. The gradient goes to the one row that wins."""
    win = _pad_rows(feats_nc, float("-inf")).index_select(0, idx.flatten()).view(*idx.shape, -1)
    out = win.max(dim=1).values
    empty = (idx == feats_nc.shape[0]).all(dim=1, keepdim=True)
    return out.masked_fill(empty, 0.0)


def _pad_rows(rows: torch.Tensor, value: float) -> torch.Tensor:
    """rows [N, C] with a row of ``value`` appended (index N reads it)."""
    return torch.cat([rows, rows.new_full((1, rows.shape[1]), value)])


def dwconv_via_dense(feats_nc: torch.Tensor, flat_n: torch.Tensor, batch_size: int, spatial_shape: tuple[int, int],
                     weight: torch.Tensor) -> torch.Tensor:
    """Depthwise conv (weight [C, 1, kh, kw], no bias) of rows at dense positions ``flat_n`` (index into
    [B*H*W]): scatter to a zero channels-last map, grouped F.conv2d, gather the active sites. Exact,
    since inactive sites are zero."""
    (h, w), c = spatial_shape, feats_nc.shape[1]
    grid = feats_nc.new_zeros(batch_size * h * w, c).index_copy(0, flat_n, feats_nc)
    x = grid.view(batch_size, h, w, c).permute(0, 3, 1, 2)  # NCHW view of channels-last memory
    kh, kw = weight.shape[-2:]
    y = F.conv2d(x, weight, None, padding=(kh // 2, kw // 2), groups=c)
    return y.permute(0, 2, 3, 1).reshape(batch_size * h * w, c).index_select(0, flat_n)


def dwconv_by_offsets(out: torch.Tensor, feats_nc: torch.Tensor, taps_kc: torch.Tensor,
                      pairs: Iterable[tuple[int, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """A library's rule-table depthwise conv: for each kernel offset k with (input rows, output rows),
    gather the inputs, scale by that offset's taps ``taps_kc[k]``, add into ``out`` (functional
    index_add: twice as fast in backward as in-place ``out[idx] +=``)."""
    for offset, in_rows, out_rows in pairs:
        out = out.index_add(0, out_rows, feats_nc.index_select(0, in_rows) * taps_kc[offset])
    return out
