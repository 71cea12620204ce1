"""The k x k / stride k downsampling (ConvNeXt's): for every output site of the next stage, the rows of
its k*k children at this stage, and the inverse map the backward uses, built once per geometry and k
(``PackedGeometry.down`` caches it; the static form needs no host sync); the conv is one gather + matmul."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .permute import _PermuteRows

if TYPE_CHECKING:
    from .geometry import PackedGeometry


def block_children(g: "PackedGeometry", k: int):
    """General geometry: see ``PackedGeometry.down`` for what is returned."""
    h, w = g.spatial_shape
    ho, wo = h // k, w // k
    n = g.num_rows
    b, y, x = g.bxy()
    by, bx = torch.div(y, k, rounding_mode="floor"), torch.div(x, k, rounding_mode="floor")
    slot = (y - by * k) * k + (x - bx * k)
    valid = (by < ho) & (bx < wo)
    total = g.batch_size * ho * wo
    pflat = torch.where(valid, (b * ho + by) * wo + bx, torch.full_like(b, total))
    covered = bool(valid.all())
    mask = torch.zeros(total + 1, dtype=torch.bool, device=g.device)
    mask[pflat] = True
    out_flat = mask[:total].nonzero().squeeze(1)
    child = type(g).from_flat(out_flat, g.batch_size, (ho, wo), g.stride * k)
    m = child.num_rows
    kk = k * k
    o2r = torch.full((total + 1,), m, dtype=torch.int64, device=g.device)
    o2r[out_flat] = torch.arange(m, device=g.device)
    parent_idx = torch.where(valid, o2r[pflat] * kk + slot, torch.full_like(slot, m * kk))
    child_idx = torch.full((m * kk,), n, dtype=torch.int64, device=g.device)
    child_idx[parent_idx[valid]] = torch.arange(n, device=g.device)[valid]
    complete = int(valid.sum()) == m * kk
    return child, child_idx, parent_idx, complete, covered


def block_children_static(g: "PackedGeometry", k: int):
    """``down`` for a static geometry whose k x k blocks are all complete (patch-aligned masks:
    every stage sees whole patches), with sizes known on the host: n / k^2 outputs per sample.
    Anything else fails the device-side count check of the child geometry."""
    h, w = g.spatial_shape
    n = g.counts[0]
    if h % k or w % k or n % (k * k):
        raise ValueError(f"static packed geometry: a {k}x{k} downsample of a {h}x{w} map with {n} sites per "
                         f"sample needs whole {k}x{k} blocks; use masks aligned with the patches or "
                         f"num_visible=None")
    ho, wo = h // k, w // k
    b, y, x = g.bxy()
    pflat = (b * ho + torch.div(y, k, rounding_mode="floor")) * wo + torch.div(x, k, rounding_mode="floor")
    mask = torch.zeros(g.batch_size * ho * wo, dtype=torch.bool, device=g.device).index_fill(0, pflat, True)
    child = type(g).from_mask_static(mask.view(g.batch_size, ho, wo), g.stride * k, n // (k * k),
                                     g.block // k)
    cb, cy, cx = child.bxy()
    dy = torch.arange(k, device=g.device)
    pos = ((cb[:, None, None] * h + cy[:, None, None] * k + dy[None, :, None]) * w
           + cx[:, None, None] * k + dy[None, None, :])        # [M, k, k] parent positions
    child_idx = g.dense_to_row()[pos.reshape(-1)]
    return child, child_idx, None, True, True


def block_conv(feats, weight, bias, g: "PackedGeometry", k: int):
    """k x k / stride k conv: each output's k*k children rows (cached per geometry), one matmul.
    -> (rows [M, C_out], the output geometry)."""
    child, child_idx, parent_idx, complete, covered = g.down(k)
    if g.static:  # every child exists: a plain gather, whose backward autograd derives
        gathered = feats.index_select(0, child_idx)
    else:
        gathered = _PermuteRows.apply(feats, child_idx, parent_idx, not complete, not covered)
    wmat = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
    return F.linear(gathered.view(child.num_rows, wmat.shape[1]), wmat, bias), child
