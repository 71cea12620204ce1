"""MinkowskiEngine backend: submanifold sparse convolutions from MinkowskiEngine 0.5.4 (``ME``).

Native tensor: ``MinkowskiTensor`` = an ``ME.SparseTensor`` (features [N, C], coordinates
(b, y, x) in its coordinate manager) plus what ME does not keep: batch_size (a sample may have no
site at all), spatial_shape (H, W) of the current grid and the stride in image pixels. This file holds
the backend's ops; minkowski_tensor.py the tensor and its coordinate-map caches; minkowski_layout.py the
kernel layouts.

What ME gives and what this module adds (scripts/build_minkowski.sh builds it; README, "Backends"):

- Coordinates are explicit: ``SparseTensor(features, coordinates=...)`` from the ``SparseBatch``,
  never ``MinkowskiOps.to_sparse`` (which drops all-zero rows). ME coordinates stay in units of the
  grid the batch entered on (the stem output for the encoder); ME's ``tensor_stride`` grows with
  every downsample (1, 2, 4, 8) and its strided coordinates are multiples of it, as ME intends.
  Leaving (``to_sparse``) divides by the tensor stride and sorts the rows to (batch, raster) order.
- Full-channel convs (``conv``, ``downsample``) are ``MinkowskiConvolutionFunction`` with the
  model's dense-layout weight [C_out, C_in, kh, kw] turned on the fly (differentiably) into ME's
  kernel [kh*kw, C_in, C_out]. ME enumerates kernel offsets with the first spatial axis (y) fastest,
  so offset index = ix * kh + iy: ``weight.permute(3, 2, 1, 0).reshape(kw * kh, C_in, C_out)``
  (``me_kernel``; the tests check it against F.conv2d, non-square kernels included). Bias is added
  afterwards (ME's function takes none). 1x1 convs are a plain matmul.
- ``downsample`` (k x k, stride k): output sites are ME's strided coordinate map (``cm.stride``:
  every k x k block holding an active site), in ME's own row order. As F.conv2d without padding (and
  timm), the output grid is floor(H/k) x floor(W/k): sites in a partial last row/column of blocks
  are first removed with ``MinkowskiPruningFunction``. ME offsets an even kernel 0..k-1 from the
  block corner, as F.conv2d does; an odd one it centres, so an odd k is run as a (k+1)-kernel
  whose extra last row and column of taps are zero.
- ``strided_conv`` (ResNet): ``MinkowskiConvolutionFunction`` from the input map to a map of the
  given output sites, inserted into the same manager (``insert_and_map``) and reused for the
  shortcut of the same block, so both land on one map and ``add`` lines up. ``max_pool`` writes
  into that map too, from a gather of each output site's window rows.
- Depthwise convs: ME 0.5.4 has no depthwise kernel (``MinkowskiDepthwiseConvolution`` is in a
  CUDA-only fork); ``MinkowskiChannelwiseConvolution`` is a Python loop over ME's kernel map. Two
  implementations, ``MinkowskiBackend(dwconv=...)`` or ``MIMSPARSE_MINKOWSKI_DWCONV``:
  ``dense`` (default): scatter the rows into a zero channels-last map, ``F.conv2d(groups=C)``,
  gather the active sites -- exact, since inactive sites are zero; ``kernel_map``: the channelwise
  loop (gather, scale by that tap, index_add per offset) over ME's kernel map, cached per site set.
  ``dense`` measured several times faster on CPU (BENCHMARKS.md, "Depthwise 7×7 on sparse rows"),
  hence the default.
- LayerNorm, the MLP, GRN (per sample), residuals: on the feature rows (``RowBackend``), rewrapped
  with the same coordinate map key and manager.
- ``to_dense`` is ME's ``SparseTensor.dense`` with an explicit shape and min_coordinate 0 (never
  inferred from the coordinates, which would crop).

Threads: ME's coordinate manager calls ``omp_set_num_threads`` with ``OMP_NUM_THREADS`` (or the CPU
count) read at import, and it shares torch's OpenMP runtime: a plain ``ME.SparseTensor(...)``
silently resets ``torch.get_num_threads()``. Each batch therefore gets its own
``CoordinateManager(num_threads=torch.get_num_threads())`` (ME's kernel-map building then uses
torch's thread count). ME's CPU convolutions call the system OpenBLAS, a second thread pool sized at
load time from ``OPENBLAS_NUM_THREADS`` (else ``OMP_NUM_THREADS``, else the CPU count); unless
``OPENBLAS_NUM_THREADS`` is set, importing this module limits it to one thread (its gemms here are
small). ``make test`` runs with ``OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1``.

Precision: ME's CPU kernels exist for float32 and float64 only (float16/bfloat16 raise
NotImplementedError deep inside ME); the backend refuses them, and autocast to them, up front.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from mimsparse.errors import ConfigError
from mimsparse.sparse import SparseBatch

from .checks import add_bias, check_conv_weight, check_strided_conv, check_window_op, is_block_conv, sites_reached
from .minkowski_layout import channelwise_kernel, me_kernel
from .minkowski_tensor import ME, ConvolutionMode, MinkowskiTensor, new_tensor
from .rows import RowBackend, dwconv_by_offsets, dwconv_via_dense, window_max, window_rows

DWCONV_IMPLS = ("dense", "kernel_map")
_DTYPES = (torch.float32, torch.float64)


# ---- the backend ------------------------------------------------------------------------------------
class MinkowskiBackend(RowBackend):
    """Backend on MinkowskiEngine 0.5.4. Option ``dwconv`` (``MIMSPARSE_MINKOWSKI_DWCONV``): ``dense``
    (scatter, grouped F.conv2d, gather; default) or ``kernel_map`` (MinkowskiChannelwiseConvolution's
    loop over ME's kernel map)."""

    name = "minkowski"

    def __init__(self, dwconv: str | None = None):
        dwconv = dwconv if dwconv is not None else os.environ.get("MIMSPARSE_MINKOWSKI_DWCONV", "dense")
        if dwconv not in DWCONV_IMPLS:
            raise ConfigError(f"unknown depthwise implementation {dwconv!r}; choose one of {', '.join(DWCONV_IMPLS)}")
        self.dwconv_impl = dwconv
        self._kernel_generators: dict[tuple[int, int, int], ME.KernelGenerator] = {}

    def __repr__(self) -> str:
        return f"MinkowskiBackend(dwconv={self.dwconv_impl!r})"

    def supported_dtypes(self, device):
        # ME 0.5.4 dispatches its kernels (CPU and CUDA) on float and double only.
        return _DTYPES

    # ---- entering and leaving -------------------------------------------------------------------
    def from_sparse(self, sb: SparseBatch) -> MinkowskiTensor:
        if min(sb.spatial_shape) < 1:
            raise ValueError(f"spatial_shape must be positive, got {sb.spatial_shape}")
        if sb.coords.device != sb.feats.device:
            raise ValueError(f"coords on {sb.coords.device} but feats on {sb.feats.device}")
        self.check_dtype(sb.feats.dtype, sb.feats.device)
        if sb.feats.is_cuda and not ME.is_cuda_available():
            raise ConfigError("this MinkowskiEngine build is CPU-only (scripts/build_minkowski.sh builds "
                             "a CUDA one where a GPU is present); use --device cpu or another backend")
        sb.validate()  # ME would merge duplicate coordinates and accept any bound
        return new_tensor(sb.feats, sb.coords, sb.batch_size, sb.spatial_shape, sb.stride)

    def to_sparse(self, t: MinkowskiTensor) -> SparseBatch:
        b, y, x = t.grid_coords()
        coords = torch.stack([b, y, x], 1).to(torch.int32)
        feats = t.feats
        order = t.raster_order()
        if order is not None:
            coords, feats = coords.index_select(0, order), feats.index_select(0, order)
        return SparseBatch(coords, feats, t.batch_size, t.spatial_shape, t.stride)

    def to_dense(self, t: MinkowskiTensor) -> torch.Tensor:
        h, w = t.spatial_shape
        shape = torch.Size([t.batch_size, t.feats.shape[1], h, w])
        origin = torch.zeros(2, dtype=torch.int32, device=t.feats.device)
        return t.st.dense(shape=shape, min_coordinate=origin, contract_stride=True)[0]

    # ---- RowBackend ----------------------------------------------------------------------------
    def feats(self, t):
        return t.feats

    def batch_index(self, t):
        return t.grid_coords()[0]

    def batch_size(self, t):
        return t.batch_size

    def with_feats(self, t, feats):
        if feats.dim() != 2 or feats.shape[0] != t.feats.shape[0]:
            raise ValueError(f"new features {tuple(feats.shape)} do not match {t.feats.shape[0]} sites")
        return t.replace(feats)

    # ---- convolutions ---------------------------------------------------------------------------
    def conv(self, t, weight, bias):
        kh, kw = check_conv_weight(weight, t.feats.shape[1], "conv")
        self.check_compute(t.feats, weight)
        if kh == kw == 1:
            out = F.linear(t.feats, weight[:, :, 0, 0])
        else:
            out = self._me_conv(t.feats, weight, kh, kw, 1, t.key, t.key, t.manager)
        return t.replace(add_bias(out, bias))

    def strided_conv(self, t, weight, bias, stride, *, padding, active_out_bhw=None):
        k, out_shape = check_strided_conv(weight, t.feats.shape[1], stride, padding, t.batch_size, t.spatial_shape,
                                          active_out_bhw)
        self.check_compute(t.feats, weight)
        if not is_block_conv(k, stride, padding, active_out_bhw):
            if k % 2 and padding == k // 2:  # a centred window: ME's conv at the given (or reached) sites
                if active_out_bhw is None:
                    active_out_bhw = sites_reached(self.to_sparse(t).active_mask(), k, stride, padding)
                return self._centred_strided_conv(t, weight, bias, stride, active_out_bhw)
            return super().strided_conv(t, weight, bias, stride, padding=padding, active_out_bhw=active_out_bhw)
        # k x k / stride k blocks: ME's own strided conv (a partial last block is dropped, as F.conv2d)
        h, w = t.spatial_shape
        if k == 1:
            return MinkowskiTensor(t.st, t.batch_size, out_shape, t.stride, t.cache).replace(
                add_bias(F.linear(t.feats, weight[:, :, 0, 0]), bias))
        feats, in_key = t.feats, t.key
        if h % k or w % k:
            _, y, x = t.grid_coords()
            keep = (y < out_shape[0] * k) & (x < out_shape[1] * k)
            if not bool(keep.any()):
                # no site in a complete block: no output site (ME's pruning would print a warning)
                out = add_bias(F.linear(feats[:0], weight[:, :, 0, 0]), bias)
                return new_tensor(out, feats.new_zeros(0, 3, dtype=torch.int32), t.batch_size, out_shape,
                                        t.stride * k, t.tensor_stride * k)
            if not bool(keep.all()):
                in_key = ME.CoordinateMapKey(in_key.get_coordinate_size())
                feats = ME.MinkowskiPruningFunction.apply(feats, keep, t.key, in_key, t.manager)
        out_key = t.manager.stride(in_key, [k, k])  # tensor stride t.tensor_stride * k
        if k % 2:
            # ME centres odd kernels; F.conv2d's block starts at the corner, as ME's even kernels do
            weight = F.pad(weight, (0, 1, 0, 1))
        out = self._me_conv(feats, weight, weight.shape[-2], weight.shape[-1], k, in_key, out_key, t.manager)
        st = ME.SparseTensor(add_bias(out, bias), coordinate_map_key=out_key, coordinate_manager=t.manager)
        return MinkowskiTensor(st, t.batch_size, out_shape, t.stride * k)

    def _centred_strided_conv(self, t, weight, bias, stride, active_out_bhw):
        kh, kw = weight.shape[-2:]
        out_key, _ = t.out_sites(stride, active_out_bhw)
        # ME centres an odd kernel on the output coordinate and steps by the input's tensor stride:
        # output (i, j) reads input (stride*i + dy - k//2, stride*j + dx - k//2), as torchvision's convs
        out = self._me_conv(t.feats, weight, kh, kw, stride, t.key, out_key, t.manager)
        st = ME.SparseTensor(add_bias(out, bias), coordinate_map_key=out_key, coordinate_manager=t.manager)
        return MinkowskiTensor(st, t.batch_size, tuple(active_out_bhw.shape[1:]), t.stride * stride)

    def max_pool(self, t, kernel, stride, active_out_bhw):
        """The max over the active sites of each window, gathered from the rows (ME's max pooling
        has no notion of an output site whose window is empty)."""
        check_window_op("max_pool", kernel, stride, t.batch_size, t.spatial_shape, active_out_bhw)
        out_key, out_coords = t.out_sites(stride, active_out_bhw)
        sb = SparseBatch(torch.stack(t.grid_coords(), 1).to(torch.int32), t.feats, t.batch_size, t.spatial_shape)
        out = window_max(t.feats, window_rows(sb, out_coords, kernel, stride, kernel // 2))
        st = ME.SparseTensor(out, coordinate_map_key=out_key, coordinate_manager=t.manager)
        return MinkowskiTensor(st, t.batch_size, tuple(active_out_bhw.shape[1:]), t.stride * stride)

    def dwconv(self, t, weight, bias):
        c = t.feats.shape[1]
        kh, kw = check_conv_weight(weight, c, "dwconv", depthwise=True)
        self.check_compute(t.feats, weight)
        if kh == kw == 1:
            out = t.feats * weight[:, 0, 0, 0]
        elif self.dwconv_impl == "dense":
            out = dwconv_via_dense(t.feats, t.flat_index(), t.batch_size, t.spatial_shape, weight)
        else:
            out = dwconv_by_offsets(t.feats.new_zeros(t.feats.shape), t.feats, channelwise_kernel(weight),
                                    t.kernel_map(kh, kw))
        return t.replace(add_bias(out, bias))

    def _me_conv(self, feats, weight, kh, kw, stride, in_key, out_key, manager) -> torch.Tensor:
        """``MinkowskiConvolutionFunction`` (no bias) from in_key's sites to out_key's."""
        gen = (kh, kw, stride)
        if gen not in self._kernel_generators:
            self._kernel_generators[gen] = ME.KernelGenerator(kernel_size=[kh, kw], stride=stride, dilation=1,
                                                              dimension=2)
        return ME.MinkowskiConvolutionFunction.apply(
            feats.contiguous(), me_kernel(weight), self._kernel_generators[gen],
            ConvolutionMode.DEFAULT, in_key, out_key, manager)
