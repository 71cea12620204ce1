"""spconv backend: submanifold sparse convolutions from spconv 2.x (``spconv.pytorch``).

Native tensor: ``SpconvTensor`` = a ``spconv.pytorch.SparseConvTensor`` (features [N, C], int32
indices [N, 3] = (b, y, x), spatial_shape [H, W], batch_size) plus the stride in image pixels.
This file holds the backend's ops; spconv_rules.py the tensor, rule tables and calls into spconv;
spconv_algo.py the choice and CUDA self-check of spconv's algorithm.

What spconv gives and what this module adds:

- Full-channel convs (``conv``, ``downsample``) run spconv's own rulebook kernels through its
  functional ops, with the model's dense-layout weight permuted on the fly to spconv's
  [out, kh, kw, in] (differentiable, so gradients land on the dense parameter). 1x1 convs are a
  plain matmul (as spconv does itself; its 1x1 weight layout differs).
- Bias is never handed to spconv (its CPU kernels crash on a bias in eval mode): added afterwards.
- Depthwise convs: spconv has no grouped conv. Two implementations:
  ``dense`` (default): scatter the rows into a zero channels-last map, ``F.conv2d(groups=C)``,
  gather the active sites; ``rulebook``: gather-multiply-scatter per kernel offset over spconv's
  submanifold rulebook. ``dense`` measured several times faster on CPU (BENCHMARKS.md, "Depthwise
  7×7 on sparse rows"), hence the default.
- Rule tables are computed once per set of sites and kept in the SparseConvTensor's
  ``indice_dict`` (spconv's indice_key mechanism: every tensor over the same sites shares that
  dict), so all blocks of a stage reuse one rulebook per kernel size; a downsample starts a new dict.
- Strided outputs are reordered to (batch, raster) order, like every ``SparseBatch``.
- ResNet's ``strided_conv``/``max_pool`` are RowBackend's gather of each output site's window rows
  (one matmul / a max): spconv's strided conv creates every output site its window touches, and
  cannot be told to evaluate at given sites only (SparK keeps the visible patches' sites).
- Algorithm: ``ConvAlgo.Native`` on CPU (the only one that runs there). On CUDA the requested
  algorithm (default Native; ``MIMSPARSE_SPCONV_ALGO=mask_implicit_gemm`` to try the implicit GEMM
  kernels) is checked once per (device, dtype, kernel, stride, channels) against ``F.conv2d`` on a
  small random problem, forward and backward; a wrong or failing algorithm falls back to Native
  (with a warning), and if Native fails too the op raises instead of returning wrong numbers.
- Inputs are validated before spconv sees them (it trusts its input): coordinates inside
  spatial_shape, no duplicates, int32 and contiguous (``Tensor.nonzero()`` returns a column-major
  tensor that spconv silently misreads), supported dtypes (float32; float16 on CUDA; no bfloat16).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from mimsparse.errors import ConfigError
from mimsparse.sparse import SparseBatch

from .checks import add_bias, check_conv_weight, check_strided_conv, is_block_conv
from .rows import RowBackend, dwconv_by_offsets, dwconv_via_dense
from .spconv_algo import ALGOS, AlgoChoice
from .spconv_rules import ConvAlgo, SpconvTensor, _make_tensor, dw_pairs, flat_index, spconv_conv

DWCONV_IMPLS = ("dense", "rulebook")


class SpconvBackend(AlgoChoice, RowBackend):
    """Backend on spconv 2.x. Options (also from the environment, so that ``get_backend('spconv')``
    can be steered without code): ``algo`` (``MIMSPARSE_SPCONV_ALGO``: native, mask_implicit_gemm,
    mask_split_implicit_gemm; CUDA only, CPU always uses native) and ``dwconv``
    (``MIMSPARSE_SPCONV_DWCONV``: dense or rulebook)."""

    name = "spconv"

    def __init__(self, algo: str | ConvAlgo | None = None, dwconv: str | None = None):
        self._init_algo(algo if algo is not None else os.environ.get("MIMSPARSE_SPCONV_ALGO", "native"))
        dwconv = dwconv if dwconv is not None else os.environ.get("MIMSPARSE_SPCONV_DWCONV", "dense")
        if dwconv not in DWCONV_IMPLS:
            raise ConfigError(f"unknown depthwise implementation {dwconv!r}; choose one of {', '.join(DWCONV_IMPLS)}")
        self.dwconv_impl = dwconv

    def __repr__(self) -> str:
        return f"SpconvBackend(algo={self.algo.name}, dwconv={self.dwconv_impl!r})"

    # ---- capabilities -----------------------------------------------------------------------------
    def supported_dtypes(self, device):
        # No bfloat16 kernels in spconv (KeyError); float16 on CPU runs through numpy (very slow).
        if torch.device(device).type == "cuda":
            return (torch.float32, torch.float16)
        return (torch.float32,)

    # ---- entering and leaving -------------------------------------------------------------------
    def from_sparse(self, sb: SparseBatch) -> SpconvTensor:
        if sb.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {sb.batch_size}")
        if min(sb.spatial_shape) < 1:
            raise ValueError(f"spatial_shape must be positive, got {sb.spatial_shape}")
        if sb.coords.device != sb.feats.device:
            raise ValueError(f"coords on {sb.coords.device} but feats on {sb.feats.device}")
        sb.validate()  # spconv neither checks bounds nor merges duplicates
        self.check_dtype(sb.feats.dtype, sb.feats.device)
        # contiguous matters: spconv reads the raw buffer, and nonzero() returns column-major indices
        return _make_tensor(sb.feats.contiguous(), sb.coords.contiguous(), sb.spatial_shape,
                            sb.batch_size, sb.stride)

    def to_sparse(self, t: SpconvTensor) -> SparseBatch:
        return SparseBatch(t.indices, t.feats, t.sp.batch_size, t.spatial_shape, t.stride)

    # ---- RowBackend ----------------------------------------------------------------------------
    def feats(self, t):
        return t.feats

    def batch_index(self, t):
        key = ("mimsparse", "batch_index")
        if key not in t.cache:
            t.cache[key] = t.indices[:, 0].long()
        return t.cache[key]

    def batch_size(self, t):
        return t.sp.batch_size

    def with_feats(self, t, feats):
        if feats.dim() != 2 or feats.shape[0] != t.indices.shape[0]:
            raise ValueError(f"new features {tuple(feats.shape)} do not match {t.indices.shape[0]} sites")
        return SpconvTensor(t.sp.replace_feature(feats), t.stride)

    # ---- convolutions ---------------------------------------------------------------------------
    def conv(self, t, weight, bias):
        k = _check_weight(weight, t.feats.shape[1], "conv", depthwise=False)
        self.check_compute(t.feats, weight)
        feats = t.feats
        if k == 1 or feats.shape[0] == 0:
            # 1x1: a matmul (spconv does the same). No site: nothing to gather, keep the graph.
            out = F.linear(feats, weight[:, :, k // 2, k // 2])
        else:
            algo = self._algo_for(feats, weight, k, 1, subm=True)
            out = spconv_conv(t, weight, k, 1, subm=True, algo=algo)[0]
        return self.with_feats(t, add_bias(out, bias))

    def strided_conv(self, t, weight, bias, stride, *, padding, active_out_bhw=None):
        k, out_shape = check_strided_conv(weight, t.feats.shape[1], stride, padding, t.sp.batch_size,
                                          t.spatial_shape, active_out_bhw)
        self.check_compute(t.feats, weight)
        if not is_block_conv(k, stride, padding, active_out_bhw):  # sites given: RowBackend's window gather
            return super().strided_conv(t, weight, bias, stride, padding=padding, active_out_bhw=active_out_bhw)
        # k x k / stride k blocks: spconv's own strided conv (a partial last block is dropped, as F.conv2d)
        feats = t.feats
        if feats.shape[0] == 0 or not self._any_site_in_blocks(t, k):
            # no output site (spconv's strided rulebook may refuse an empty result, on CUDA)
            out = F.linear(feats[:0], weight[:, :, 0, 0])
            idx = t.indices.new_zeros(0, 3)
        elif k == 1:
            out, idx = F.linear(feats, weight[:, :, 0, 0]), t.indices
        else:
            algo = self._algo_for(feats, weight, k, k, subm=False)
            out, idx = spconv_conv(t, weight, k, k, subm=False, algo=algo)
        return _make_tensor(add_bias(out, bias), idx, out_shape, t.sp.batch_size, t.stride * k)

    @staticmethod
    def _any_site_in_blocks(t: SpconvTensor, k: int) -> bool:
        """Whether some site lies in a complete k x k block (those in a partial last row or column
        of blocks reach no output)."""
        h, w = t.spatial_shape
        if h % k == 0 and w % k == 0:
            return True
        y, x = t.indices[:, 1], t.indices[:, 2]
        return bool(((y < h - h % k) & (x < w - w % k)).any())

    def dwconv(self, t, weight, bias):
        c = t.feats.shape[1]
        k = _check_weight(weight, c, "dwconv", depthwise=True)
        self.check_compute(t.feats, weight)
        feats = t.feats
        if k == 1 or feats.shape[0] == 0:
            out = feats * weight[:, 0, k // 2, k // 2]
        elif self.dwconv_impl == "dense":
            out = dwconv_via_dense(feats, flat_index(t), t.sp.batch_size, t.spatial_shape, weight)
        else:
            out = self._dwconv_rulebook(t, weight, k)
        return self.with_feats(t, add_bias(out, bias))

    def _dwconv_rulebook(self, t: SpconvTensor, weight: torch.Tensor, k: int) -> torch.Tensor:
        """Per kernel offset: gather the input rows, scale by that tap, scatter-add to the outputs."""
        feats = t.feats
        taps = weight.reshape(weight.shape[0], k * k).t()  # [k*k, C]
        center = (k * k) // 2
        out = feats * taps[center]  # submanifold: the centre tap maps every site onto itself
        return dwconv_by_offsets(out, feats, taps, dw_pairs(t, k))


def _check_weight(weight: torch.Tensor, channels: int, op: str, depthwise: bool) -> int:
    kh, kw = check_conv_weight(weight, channels, op, depthwise)
    if kh != kw:
        raise ValueError(f"{op}: expected a square kernel weight [C_out, C_in, k, k], got {tuple(weight.shape)}")
    return kh


__all__ = ["ALGOS", "ConvAlgo", "SpconvBackend", "SpconvTensor"]
