"""spconv backend: submanifold sparse convolutions from spconv 2.x (``spconv.pytorch``).

Native tensor: ``SpconvTensor`` = a ``spconv.pytorch.SparseConvTensor`` (features [N, C], int32
indices [N, 3] = (b, y, x), spatial_shape [H, W], batch_size) plus the stride in image pixels.

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

import logging
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mimsparse.errors import ConfigError
from mimsparse.sparse import SparseBatch

from .checks import (add_bias, autocast_dtype, check_conv_weight, check_strided_conv, dtype_name, is_block_conv,
                     max_rel_error)
from .rows import RowBackend, dwconv_by_offsets, dwconv_via_dense

with warnings.catch_warnings():
    # spconv decorates its autograd functions with the deprecated torch.cuda.amp.custom_fwd
    warnings.simplefilter("ignore", FutureWarning)
    from spconv.core import ConvAlgo
    from spconv.pytorch import SparseConvTensor
    from spconv.pytorch import functional as Fsp
    from spconv.pytorch import ops as spops
    from spconv.pytorch.core import ImplicitGemmIndiceData, IndiceData


def _silence_fx_notice() -> None:
    # SparseConvTensor's metaclass (torch.fx.ProxyableClassMeta) logs a one-off notice about
    # is_fx_tracing on the first construction; trigger it here with that logger muted.
    log = logging.getLogger("torch.fx._symbolic_trace")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        SparseConvTensor(torch.zeros(1, 1), torch.zeros(1, 3, dtype=torch.int32), [1, 1], 1)
    finally:
        log.setLevel(level)


_silence_fx_notice()

ALGOS = {
    "native": ConvAlgo.Native,
    "mask_implicit_gemm": ConvAlgo.MaskImplicitGemm,
    "mask_split_implicit_gemm": ConvAlgo.MaskSplitImplicitGemm,
}
DWCONV_IMPLS = ("dense", "rulebook")
# Largest relative error (max |a - b| / max |b|) the CUDA self-check accepts. Loose enough for
# TF32/fp16 rounding (seen: 3e-4 fp32, 2e-3 fp16), far below a wrong kernel (seen: ~1).
_CHECK_TOL = {torch.float32: 1e-2, torch.float16: 3e-2}


@dataclass(eq=False)
class SpconvTensor:
    """The backend's native tensor: spconv's tensor plus the stride (image pixels per site).

    ``sp.indice_dict`` is the per-site-set cache (rule tables under spconv's string keys, this
    module's index helpers under tuple keys); ``with_feats`` keeps it, ``downsample`` starts anew.
    """

    sp: SparseConvTensor
    stride: int = 1

    @property
    def feats(self) -> torch.Tensor:
        """Feature rows [N, C] (spconv's ``features``), named as every backend's tensor names them."""
        return self.sp.features

    @property
    def indices(self) -> torch.Tensor:
        return self.sp.indices

    @property
    def cache(self) -> dict:
        return self.sp.indice_dict

    @property
    def spatial_shape(self) -> tuple[int, int]:
        return tuple(self.sp.spatial_shape)

    def __repr__(self) -> str:
        return (f"SpconvTensor(sites={self.indices.shape[0]}, channels={self.feats.shape[1]}, "
                f"batch={self.sp.batch_size}, spatial_shape={self.spatial_shape}, stride={self.stride})")


def _make_tensor(feats, indices, spatial_shape, batch_size, stride) -> SpconvTensor:
    sp = SparseConvTensor(feats, indices, list(spatial_shape), batch_size)
    return SpconvTensor(sp, stride)






class SpconvBackend(RowBackend):
    """Backend on spconv 2.x. Options (also from the environment, so that ``get_backend('spconv')``
    can be steered without code): ``algo`` (``MIMSPARSE_SPCONV_ALGO``: native, mask_implicit_gemm,
    mask_split_implicit_gemm; CUDA only, CPU always uses native) and ``dwconv``
    (``MIMSPARSE_SPCONV_DWCONV``: dense or rulebook)."""

    name = "spconv"

    def __init__(self, algo: str | ConvAlgo | None = None, dwconv: str | None = None):
        algo = algo if algo is not None else os.environ.get("MIMSPARSE_SPCONV_ALGO", "native")
        if isinstance(algo, str):
            if algo.lower() not in ALGOS:
                raise ConfigError(f"unknown spconv algorithm {algo!r}; choose one of {', '.join(ALGOS)}")
            algo = ALGOS[algo.lower()]
        if algo not in ALGOS.values():
            raise ConfigError(f"unsupported spconv algorithm {algo}; choose one of {', '.join(ALGOS)}")
        dwconv = dwconv if dwconv is not None else os.environ.get("MIMSPARSE_SPCONV_DWCONV", "dense")
        if dwconv not in DWCONV_IMPLS:
            raise ConfigError(f"unknown depthwise implementation {dwconv!r}; choose one of {', '.join(DWCONV_IMPLS)}")
        self.algo = algo
        self.dwconv_impl = dwconv
        # (device, dtype, k, stride, subm, c_in, c_out) -> the algorithm verified for it (CUDA only)
        self._verified_algo: dict[tuple, ConvAlgo] = {}

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
            out = self._spconv_conv(t, weight, k, 1, subm=True, algo=algo)[0]
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
            out, idx = self._spconv_conv(t, weight, k, k, subm=False, algo=algo)
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
            out = dwconv_via_dense(feats, self._flat_index(t), t.sp.batch_size, t.spatial_shape, weight)
        else:
            out = self._dwconv_rulebook(t, weight, k)
        return self.with_feats(t, add_bias(out, bias))

    def _dwconv_rulebook(self, t: SpconvTensor, weight: torch.Tensor, k: int) -> torch.Tensor:
        """Per kernel offset: gather the input rows, scale by that tap, scatter-add to the outputs."""
        feats = t.feats
        taps = weight.reshape(weight.shape[0], k * k).t()  # [k*k, C]
        center = (k * k) // 2
        out = feats * taps[center]  # submanifold: the centre tap maps every site onto itself
        return dwconv_by_offsets(out, feats, taps, self._dw_pairs(t, k))

    # ---- spconv calls -------------------------------------------------------------------------------
    def _spconv_conv(self, t: SpconvTensor, weight: torch.Tensor, k: int, stride: int, subm: bool,
                     algo: ConvAlgo) -> tuple[torch.Tensor, torch.Tensor]:
        """spconv's k x k conv (stride ``stride``) without bias -> (features, int32 indices).
        Strided outputs come back in (batch, raster) order."""
        feats = t.feats.contiguous()
        w_krsc = weight.permute(0, 2, 3, 1).contiguous()  # torch [out, in, kh, kw] -> spconv [out, kh, kw, in]
        rules = self._rules(t, k, stride, subm, algo)
        n_out = rules.out_indices.shape[0]
        if algo == ConvAlgo.Native:
            pairs = rules.indice_pairs
            if pairs.device != feats.device:
                pairs = pairs.to(feats.device)
            fn = Fsp.indice_subm_conv if subm else Fsp.indice_conv
            out = fn(feats, w_krsc, pairs, rules.indice_pair_num, n_out, algo)
        else:
            out = Fsp.implicit_gemm(
                feats, w_krsc, rules.pair_fwd, rules.pair_bwd, rules.pair_mask_fwd_splits,
                rules.pair_mask_bwd_splits, rules.mask_argsort_fwd_splits, rules.mask_argsort_bwd_splits,
                n_out, rules.masks, True, subm)
        if subm:
            return out, t.indices
        order = t.cache[_order_key(k, stride, algo)]
        return out.index_select(0, order), rules.out_indices.index_select(0, order)

    def _rules(self, t: SpconvTensor, k: int, stride: int, subm: bool, algo: ConvAlgo):
        """The rule table for this kernel on t's sites, computed once and kept in t's indice_dict."""
        key = _rule_key(k, stride, subm, algo)
        rules = t.cache.get(key)
        if rules is not None:
            return rules
        indices, shape, bs = t.indices, list(t.spatial_shape), t.sp.batch_size
        ksize, strides = [k, k], [stride, stride]
        padding = [k // 2] * 2 if subm else [0, 0]
        if algo == ConvAlgo.Native:
            out_idx, pairs, counts = spops.get_indice_pairs(
                indices, bs, shape, algo, ksize, strides, padding, [1, 1], [0, 0], subm)
            out_shape = shape if subm else spops.get_conv_output_size(shape, ksize, strides, padding, [1, 1])
            rules = IndiceData(out_idx, indices, pairs, counts, shape, out_shape, is_subm=subm, algo=algo,
                               ksize=ksize, stride=strides, dilation=[1, 1], padding=padding)
        else:
            res = spops.get_indice_pairs_implicit_gemm(
                indices, bs, shape, algo, ksize, strides, padding, [1, 1], [0, 0], subm,
                is_train=True)  # backward tables too: the same table serves training and eval
            out_shape = shape if subm else spops.get_conv_output_size(shape, ksize, strides, padding, [1, 1])
            rules = ImplicitGemmIndiceData(
                res[0], indices, res[2], res[3], pair_mask_fwd_splits=res[4], pair_mask_bwd_splits=res[5],
                mask_argsort_fwd_splits=res[6], mask_argsort_bwd_splits=res[7], masks=res[8],
                spatial_shape=shape, out_spatial_shape=out_shape, is_subm=subm, algo=algo, ksize=ksize,
                stride=strides, dilation=[1, 1], padding=padding)
        if not subm:
            # spconv's strided output order is arbitrary: keep a permutation to (batch, raster) order
            b, y, x = rules.out_indices.long().unbind(1)
            ho, wo = out_shape
            t.cache[_order_key(k, stride, algo)] = ((b * ho + y) * wo + x).argsort()
        t.cache[key] = rules
        return rules

    def _dw_pairs(self, t: SpconvTensor, k: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """(offset, input rows, output rows) per non-centre kernel offset, from spconv's Native
        submanifold rulebook. spconv stores the counts of the first half of the offsets only; offset
        i > centre holds as many pairs as its mirror kv-1-i (its consumer ops.indice_conv does the same)."""
        key = ("mimsparse", "dw_pairs", k)
        if key not in t.cache:
            rules = self._rules(t, k, 1, True, ConvAlgo.Native)
            pairs = rules.indice_pairs.to(t.feats.device).long()
            counts = rules.indice_pair_num.tolist()
            kv, center = k * k, (k * k) // 2
            table = []
            for i in range(kv):
                if i == center:
                    continue
                n = counts[i] if i < center else counts[kv - 1 - i]
                if n > 0:
                    table.append((i, pairs[0, i, :n], pairs[1, i, :n]))
            t.cache[key] = table
        return t.cache[key]

    def _flat_index(self, t: SpconvTensor) -> torch.Tensor:
        key = ("mimsparse", "flat_index")
        if key not in t.cache:
            b, y, x = t.indices.long().unbind(1)
            h, w = t.spatial_shape
            t.cache[key] = (b * h + y) * w + x
        return t.cache[key]

    # ---- algorithm choice -------------------------------------------------------------------------
    def _algo_for(self, feats: torch.Tensor, weight: torch.Tensor, k: int, stride: int, subm: bool) -> ConvAlgo:
        device = feats.device
        if device.type != "cuda":
            return ConvAlgo.Native  # the only algorithm spconv runs on CPU
        dtype = autocast_dtype(device) or feats.dtype
        return self._resolve_algo(device, dtype, k, stride, subm, weight.shape[1], weight.shape[0])

    def _resolve_algo(self, device: torch.device, dtype: torch.dtype, k: int, stride: int, subm: bool,
                      c_in: int, c_out: int) -> ConvAlgo:
        """The first of (requested algorithm, Native) that passes ``_check_algo`` for this config."""
        key = (str(device), dtype, k, stride, subm, c_in, c_out)
        if key in self._verified_algo:
            return self._verified_algo[key]
        candidates = [self.algo] + ([ConvAlgo.Native] if self.algo != ConvAlgo.Native else [])
        failures = []
        for algo in candidates:
            try:
                with torch.enable_grad():  # the op may run under no_grad (eval); the check needs backward
                    err = self._check_algo(algo, device, dtype, k, stride, subm, c_in, c_out)
            except Exception as e:  # e.g. a JIT compile failure or "Not Implemented"
                failures.append(f"{algo.name}: {type(e).__name__}: {e}")
                continue
            if err <= _CHECK_TOL.get(dtype, 1e-2):
                if failures:
                    warnings.warn(f"spconv: {'; '.join(failures)}; using {algo.name} for {k}x{k} "
                                  f"stride {stride} convs on {device}", RuntimeWarning, stacklevel=3)
                self._verified_algo[key] = algo
                return algo
            failures.append(f"{algo.name}: relative error {err:.3g} against F.conv2d")
        raise RuntimeError(
            f"spconv gives wrong results or fails for a {k}x{k} stride-{stride} "
            f"{'submanifold ' if subm else ''}conv ({c_in}->{c_out} channels, {dtype_name(dtype)}) on {device}: "
            f"{'; '.join(failures)}. Use another backend (dense, packed) or another spconv build."
        )

    def _check_algo(self, algo: ConvAlgo, device: torch.device, dtype: torch.dtype, k: int, stride: int,
                    subm: bool, c_in: int, c_out: int) -> float:
        """Relative error of spconv's conv (this module's own code path, forward and backward)
        against float64 F.conv2d on the CPU, on a small random problem."""
        g = torch.Generator().manual_seed(0)
        b, h, w = 2, 3 * k + 2, 2 * k + 3
        active = torch.rand(b, h, w, generator=g) < 0.5
        active[0, 0, 0] = True
        x = torch.randn(b, c_in, h, w, generator=g, dtype=torch.float64) * active.unsqueeze(1)
        wt = torch.randn(c_out, c_in, k, k, generator=g, dtype=torch.float64) / (c_in * k * k) ** 0.5
        gout_dense = torch.randn(b, c_out, h // stride, w // stride, generator=g, dtype=torch.float64)

        # reference: masked dense conv, float64 on the CPU
        x_ref, w_ref = x.clone().requires_grad_(), wt.clone().requires_grad_()
        out_active = active if subm else F.max_pool2d(active[:, None].double(), stride)[:, 0] > 0
        pad = k // 2 if subm else 0
        ref = F.conv2d(x_ref, w_ref, stride=stride, padding=pad) * out_active.unsqueeze(1)
        (ref * gout_dense).sum().backward()

        sb = SparseBatch.from_dense(x.to(dtype), active)
        t = _make_tensor(sb.feats.to(device).contiguous().requires_grad_(), sb.coords.to(device).contiguous(),
                         sb.spatial_shape, b, 1)
        w_dev = wt.to(device=device, dtype=dtype).requires_grad_()
        out, idx = self._spconv_conv(t, w_dev, k, stride, subm, algo)
        ib, iy, ix = idx.long().cpu().unbind(1)
        gout = gout_dense.permute(0, 2, 3, 1)[ib, iy, ix]
        out.backward(gout.to(device=device, dtype=out.dtype))
        ref_rows = ref.detach().permute(0, 2, 3, 1)[ib, iy, ix]
        if not torch.equal(out_active, SparseBatch(idx.cpu(), out.detach().cpu(), b, out_active.shape[1:]).active_mask()):
            return float("inf")
        sb_b, sb_y, sb_x = sb.coords.long().unbind(1)
        errs = [
            max_rel_error(out.detach().cpu(), ref_rows),
            max_rel_error(t.feats.grad.cpu(), x_ref.grad.permute(0, 2, 3, 1)[sb_b, sb_y, sb_x]),
            max_rel_error(w_dev.grad.cpu(), w_ref.grad),
        ]
        return max(errs)


def _rule_key(k: int, stride: int, subm: bool, algo: ConvAlgo) -> str:
    # spconv-style indice keys; the algorithm is part of the key (spconv forbids mixing them per key)
    base = f"subm{k}x{k}" if subm else f"conv{k}x{k}s{stride}"
    return base if algo == ConvAlgo.Native else f"{base}_{algo.name}"


def _order_key(k: int, stride: int, algo: ConvAlgo) -> tuple:
    return ("mimsparse", "raster_order", k, stride, algo.name)


def _check_weight(weight: torch.Tensor, channels: int, op: str, depthwise: bool) -> int:
    kh, kw = check_conv_weight(weight, channels, op, depthwise)
    if kh != kw:
        raise ValueError(f"{op}: expected a square kernel weight [C_out, C_in, k, k], got {tuple(weight.shape)}")
    return kh