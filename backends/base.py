"""The backend interface: the few sparse operations a ConvNet encoder needs.

Model code holds the parameters (in timm's dense layout, e.g. conv weights [out, in, kh, kw]) and
passes them to these operations; a backend owns no parameters. That is what keeps checkpoints
independent of the backend: every backend reshapes the dense-layout weights to its library's layout
on the fly.

A backend works on its own *native* tensor type (a masked dense map, an ``ME.SparseTensor``, a
``spconv.SparseConvTensor``, packed rows); ``SparseBatch`` is the common currency to enter and leave.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

import torch
import torch.nn.functional as F

from mimsparse.sparse import SparseBatch

Native = Any
FeatureFn = Callable[[torch.Tensor], torch.Tensor]


class Backend(ABC):
    """Submanifold sparse ops over the active sites of a batch of 2D maps.

    Semantics every backend must reproduce (tests compare each backend with ``dense``):
    - ``conv``/``dwconv``: stride-1 k x k convolution, zero padding, evaluated at active sites only,
      reading only active sites (inactive ones count as zero). The active set is unchanged.
    - ``downsample``: k x k convolution with stride k; an output site is active when any of its
      k x k input block is.
    - ``map_feats``: a function applied to each active site's feature vector (LayerNorm, Linear, GELU).
    - ``grn``: Global Response Normalisation with statistics per sample over that sample's active
      sites (not over the whole batch).
    - ``batch_norm``: BatchNorm with statistics over the active sites of the whole batch (SparK).
    - ``strided_conv``/``max_pool``: k x k windows centred on stride * (output site) (zero padding
      k // 2, torchvision's ResNet geometry), reading active input sites only, evaluated exactly at
      the output sites the caller gives.
    """

    name: str = "base"

    # ---- entering and leaving -------------------------------------------------------------------
    @abstractmethod
    def from_sparse(self, sb: SparseBatch) -> Native: ...

    @abstractmethod
    def to_sparse(self, t: Native) -> SparseBatch: ...

    def from_dense(self, x_bchw: torch.Tensor, active_bhw: torch.Tensor, stride: int = 1) -> Native:
        return self.from_sparse(SparseBatch.from_dense(x_bchw, active_bhw, stride))

    def to_dense(self, t: Native) -> torch.Tensor:
        """[B, C, H, W] with zeros at inactive sites."""
        return self.to_sparse(t).to_dense()

    def patch_embed(self, image: torch.Tensor, active_bhw: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None, stride: int, rows_per_sample: int | None = None) -> Native:
        """Non-overlapping k x k / stride k conv of a dense image, kept at ``active_bhw`` (output grid).

        ``rows_per_sample``: when the caller knows every sample has exactly this many active sites, a
        backend may build its indices from it without host syncs (packed's static mode); others ignore it.

        Patches do not overlap and the mask is aligned with them, so no pixel of a masked patch
        reaches an active site: a dense conv of the image is exact and cheap (few input channels).
        """
        out = F.conv2d(image, weight, bias, stride=weight.shape[-1])
        return self.from_dense(out, active_bhw, stride)

    # ---- convolutions (weights in torch's dense layout) -----------------------------------------
    @abstractmethod
    def conv(self, t: Native, weight: torch.Tensor, bias: torch.Tensor | None) -> Native:
        """Submanifold k x k conv, full channels; weight [C_out, C_in, k, k]."""

    @abstractmethod
    def dwconv(self, t: Native, weight: torch.Tensor, bias: torch.Tensor | None) -> Native:
        """Submanifold depthwise k x k conv; weight [C, 1, k, k]."""

    @abstractmethod
    def downsample(self, t: Native, weight: torch.Tensor, bias: torch.Tensor | None) -> Native:
        """k x k conv with stride k; weight [C_out, C_in, k, k]."""

    @abstractmethod
    def strided_conv(self, t: Native, weight: torch.Tensor, bias: torch.Tensor | None, stride: int,
                     active_out_bhw: torch.Tensor) -> Native:
        """k x k conv (weight [C_out, C_in, k, k], k odd or 1), stride ``stride``, zero padding k // 2
        (torchvision ResNet geometry: output site (i, j) reads input (stride*i + dy - k//2,
        stride*j + dx - k//2)), reading only active input sites (inactive = 0), evaluated at exactly
        the output sites ``active_out_bhw`` (bool [B, ceil(H/stride), ceil(W/stride)]); the result's
        stride is ``t``'s stride * ``stride``."""

    @abstractmethod
    def max_pool(self, t: Native, kernel: int, stride: int, active_out_bhw: torch.Tensor) -> Native:
        """k x k max pool with stride ``stride`` and padding k // 2 (geometry as ``strided_conv``),
        the max over the ACTIVE input sites of each window only, evaluated at the output sites
        ``active_out_bhw``; an output site whose window holds no active input gets 0."""

    # ---- per-site and per-sample ops ------------------------------------------------------------
    @abstractmethod
    def map_feats(self, t: Native, fn: FeatureFn) -> Native:
        """Apply ``fn`` to the channel (last) dimension of every active site's features."""

    @abstractmethod
    def grn(self, t: Native, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> Native: ...

    @abstractmethod
    def batch_norm(self, t: Native, bn: torch.nn.BatchNorm2d) -> Native:
        """BatchNorm over the active sites only (SparK's SparseBatchNorm): ``bn`` itself runs on the
        [N, C] rows of all active sites of the batch (see ``batch_norm_rows``), so training mode
        normalises with their mean / biased variance and updates bn's running statistics exactly
        as ``nn.BatchNorm2d`` does; eval mode uses the running statistics. Inactive sites stay
        zero / absent."""

    @abstractmethod
    def add(self, a: Native, b: Native) -> Native:
        """Sum of two tensors with the same active sites (residual connections)."""

    @abstractmethod
    def scale_samples(self, t: Native, scale_b: torch.Tensor) -> Native:
        """Multiply every site of sample b by ``scale_b[b]`` (stochastic depth)."""

    # ---- capabilities -----------------------------------------------------------------------------
    def supported_dtypes(self, device: torch.device) -> tuple[torch.dtype, ...]:
        if device.type == "cuda":
            return (torch.float32, torch.float16, torch.bfloat16)
        return (torch.float32, torch.bfloat16)

    def check_dtype(self, dtype: torch.dtype, device: torch.device) -> None:
        supported = self.supported_dtypes(torch.device(device))
        if dtype not in supported:
            names = ", ".join(dtype_name(d) for d in supported)
            raise TypeError(
                f"the {self.name} backend does not support {dtype_name(dtype)} on "
                f"{torch.device(device).type}; supported: {names} (use --amp none or another backend)"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class RowBackend(Backend):
    """Shared per-site/per-sample ops for backends whose native tensor stores feature rows [N, C]
    plus a batch index per row (packed, spconv, MinkowskiEngine)."""

    @abstractmethod
    def feats(self, t: Native) -> torch.Tensor: ...

    @abstractmethod
    def batch_index(self, t: Native) -> torch.Tensor:
        """int64 [N]: the sample each row belongs to."""

    @abstractmethod
    def batch_size(self, t: Native) -> int: ...

    @abstractmethod
    def with_feats(self, t: Native, feats: torch.Tensor) -> Native:
        """Same sites, new feature rows."""

    def map_feats(self, t, fn):
        return self.with_feats(t, fn(self.feats(t)))

    def grn(self, t, weight, bias, eps=1e-6):
        f = self.feats(t)
        gx = per_sample_l2_norm(f, self.batch_index(t), self.batch_size(t))
        nx = gx / (gx.mean(dim=1, keepdim=True) + eps)
        # index_select: much faster backward on CPU than advanced indexing nx[batch]
        out = f + torch.addcmul(bias, weight, f * nx.index_select(0, self.batch_index(t)))
        return self.with_feats(t, out)

    def batch_norm(self, t, bn):
        return self.with_feats(t, batch_norm_rows(self.feats(t), bn))

    def strided_conv(self, t, weight, bias, stride, active_out_bhw):
        """Gather the k x k window rows of every output site (a zero row for missing taps), one matmul."""
        sb = self.to_sparse(t)
        check_conv_weight(weight, sb.num_channels, "strided_conv")
        check_window_op("strided_conv", weight.shape[-1], stride, sb.batch_size, sb.spatial_shape, active_out_bhw)
        out_coords = active_out_bhw.nonzero().to(torch.int32)
        idx = window_rows(sb, out_coords, weight.shape[-1], stride)
        cols = _pad_rows(sb.feats, 0.0).index_select(0, idx.flatten()).view(idx.shape[0], -1)
        # cols are laid out (dy, dx, C_in): the weight's (kh, kw, C_in) flattened
        out = F.linear(cols, weight.permute(0, 2, 3, 1).flatten(1).to(cols.dtype), bias)
        return self.from_sparse(SparseBatch(out_coords, out, sb.batch_size, active_out_bhw.shape[1:],
                                            sb.stride * stride))

    def max_pool(self, t, kernel, stride, active_out_bhw):
        """Gather the k x k window rows of every output site (-inf for missing taps), max over them."""
        sb = self.to_sparse(t)
        check_window_op("max_pool", kernel, stride, sb.batch_size, sb.spatial_shape, active_out_bhw)
        out_coords = active_out_bhw.nonzero().to(torch.int32)
        idx = window_rows(sb, out_coords, kernel, stride)
        out = window_max(sb.feats, idx)
        return self.from_sparse(SparseBatch(out_coords, out, sb.batch_size, active_out_bhw.shape[1:],
                                            sb.stride * stride))

    def add(self, a, b):
        return self.with_feats(a, self.feats(a) + self.feats(b))

    def scale_samples(self, t, scale_b):
        f = self.feats(t)
        return self.with_feats(t, f * scale_b.to(f.dtype).index_select(0, self.batch_index(t)).unsqueeze(1))


def per_sample_l2_norm(feats_nc: torch.Tensor, batch_n: torch.Tensor, batch_size: int) -> torch.Tensor:
    """[B, C]: L2 norm over each sample's rows. A sample without rows gets 0, with zero gradient
    (a plain sqrt would give 0 * inf = NaN in backward, unlike torch.linalg.vector_norm)."""
    sumsq = feats_nc.new_zeros(batch_size, feats_nc.shape[1], dtype=torch.float32)
    sumsq = sumsq.index_add(0, batch_n, feats_nc.float().square())
    positive = sumsq > 0
    norm = torch.where(positive, sumsq, torch.ones_like(sumsq)).sqrt() * positive
    return norm.to(feats_nc.dtype)


def batch_norm_rows(feats_nc: torch.Tensor, bn: torch.nn.BatchNorm2d) -> torch.Tensor:
    """[N, C] -> [N, C]: ``bn`` applied to the rows as an [N, C, 1, 1] map. Its statistics are then
    over the rows (the active sites), and the module's own forward does the bookkeeping (momentum or
    cumulative average, unbiased running variance, num_batches_tracked, eval mode, and cross-process
    statistics after ``nn.SyncBatchNorm.convert_sync_batchnorm``)."""
    return bn(feats_nc[:, :, None, None]).flatten(1)


def check_window_op(op: str, kernel: int, stride: int, batch_size: int, spatial_shape: tuple[int, int],
                    active_out_bhw: torch.Tensor) -> None:
    """A stride-``stride`` k x k window op (``strided_conv``, ``max_pool``) needs an odd k (padding
    k // 2 centres it) and an output mask on its output grid (batch, ceil(H/stride), ceil(W/stride))."""
    if kernel % 2 == 0 or stride < 1:
        raise ValueError(f"{op}: needs an odd kernel and a stride >= 1 (padding k // 2 centres the window), "
                         f"got kernel {kernel}, stride {stride}")
    h, w = spatial_shape
    expected = (batch_size, -(-h // stride), -(-w // stride))
    if tuple(active_out_bhw.shape) != expected:
        raise ValueError(f"{op}: output mask {tuple(active_out_bhw.shape)} does not match the output grid "
                         f"{expected} of stride {stride} on a {h}x{w} map: pass the mask of the next stage")


def window_rows(sb: SparseBatch, out_coords: torch.Tensor, k: int, stride: int) -> torch.Tensor:
    """int64 [M, k*k]: the row of ``sb`` at tap (dy, dx) (index dy * k + dx) of the k x k window of
    each output site (b, i, j) in ``out_coords`` [M, 3], i.e. input site (stride*i + dy - k//2,
    stride*j + dx - k//2); N = number of rows where that site is outside the map or inactive."""
    h, w = sb.spatial_shape
    n = sb.feats.shape[0]
    dev = sb.coords.device
    b, y, x = sb.coords.long().unbind(1)
    dense_to_row = torch.full((sb.batch_size * h * w,), n, dtype=torch.int64, device=dev)
    dense_to_row[(b * h + y) * w + x] = torch.arange(n, device=dev)
    ob, oy, ox = out_coords.long().unbind(1)
    taps = torch.arange(k, device=dev) - k // 2
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


# ---- helpers shared by the library backends -----------------------------------------------------
def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast would compute in on this device type, or None when it is off."""
    kind = device.type
    try:
        return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
    except TypeError:  # torch < 2.4: no device_type argument
        if kind == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
        if kind == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        return None


def check_conv_weight(weight: torch.Tensor, channels: int, op: str, depthwise: bool = False) -> tuple[int, int]:
    """Validate a dense-layout conv weight against the features; returns (kh, kw)."""
    if weight.dim() != 4:
        raise ValueError(f"{op}: expected a conv weight [C_out, C_in, kh, kw], got {tuple(weight.shape)}")
    kh, kw = weight.shape[-2:]
    if depthwise and weight.shape[1] != 1:
        raise ValueError(f"{op}: depthwise weight must be [C, 1, kh, kw], got {tuple(weight.shape)}")
    c_in = weight.shape[0] if depthwise else weight.shape[1]
    if c_in != channels:
        raise ValueError(f"{op}: weight {tuple(weight.shape)} expects {c_in} input channels, features have {channels}")
    if op != "downsample" and (kh % 2 == 0 or kw % 2 == 0):
        raise ValueError(f"{op}: submanifold convs need odd kernel sizes, got {kh}x{kw}")
    return kh, kw


def add_bias(out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return out if bias is None else out + bias.to(out.dtype)
