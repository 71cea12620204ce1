"""spconv's side of the spconv backend: the native tensor (``SpconvTensor``), the rule tables of a set of
sites (computed once and kept in the tensor's ``indice_dict``, spconv's indice_key mechanism) and the
calls into spconv's functional convs. Importing this module imports spconv."""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch

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


def spconv_conv(t: SpconvTensor, weight: torch.Tensor, k: int, stride: int, subm: bool,
                algo: ConvAlgo) -> tuple[torch.Tensor, torch.Tensor]:
    """spconv's k x k conv (stride ``stride``) without bias -> (features, int32 indices).
    Strided outputs come back in (batch, raster) order."""
    feats = t.feats.contiguous()
    w_krsc = weight.permute(0, 2, 3, 1).contiguous()  # torch [out, in, kh, kw] -> spconv [out, kh, kw, in]
    rules = conv_rules(t, k, stride, subm, algo)
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


def conv_rules(t: SpconvTensor, k: int, stride: int, subm: bool, algo: ConvAlgo):
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


def dw_pairs(t: SpconvTensor, k: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(offset, input rows, output rows) per non-centre kernel offset, from spconv's Native
    submanifold rulebook. spconv stores the counts of the first half of the offsets only; offset
    i > centre holds as many pairs as its mirror kv-1-i (its consumer ops.indice_conv does the same)."""
    key = ("mimsparse", "dw_pairs", k)
    if key not in t.cache:
        rules = conv_rules(t, k, 1, True, ConvAlgo.Native)
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


def flat_index(t: SpconvTensor) -> torch.Tensor:
    key = ("mimsparse", "flat_index")
    if key not in t.cache:
        b, y, x = t.indices.long().unbind(1)
        h, w = t.spatial_shape
        t.cache[key] = (b * h + y) * w + x
    return t.cache[key]


def _rule_key(k: int, stride: int, subm: bool, algo: ConvAlgo) -> str:
    # spconv-style indice keys; the algorithm is part of the key (spconv forbids mixing them per key)
    base = f"subm{k}x{k}" if subm else f"conv{k}x{k}s{stride}"
    return base if algo == ConvAlgo.Native else f"{base}_{algo.name}"


def _order_key(k: int, stride: int, algo: ConvAlgo) -> tuple:
    return ("mimsparse", "raster_order", k, stride, algo.name)
