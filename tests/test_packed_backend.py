"""The packed backend against the masked-dense reference (and plain F.conv2d on masked inputs).

Every op is checked forward and backward (grads w.r.t. weights, bias and input features) on random,
non-aligned sparsity, non-square maps and a batch with an all-masked sample; the whole encoder and
FCMAE must give the same outputs, loss and parameter gradients as the dense backend.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mimsparse.backends import get_backend
from mimsparse.backends.dense import MaskedDenseBackend
from mimsparse.backends.packed import TILE_CHUNK_FLOATS, PackedBackend, PackedGeometry, PackedTensor
from mimsparse.models.build import build_fcmae
from mimsparse.config import ModelConfig, PretrainConfig
from mimsparse.models.convnextv2 import GRN, SparseConvNeXtV2
from mimsparse.masking import random_patch_mask, upsample_mask
from mimsparse.sparse import SparseBatch
from tests.helpers import check_conv_against_conv2d, downsample, random_active, rel_err

TOL = 1e-4
DENSE = MaskedDenseBackend()
PACKED = PackedBackend()
# depthwise variants: auto; the dense scratch-buffer path; halo tiles (gather mode) small, non-square,
# one tile per chunk, two tiles per chunk (last chunk padded); whole-map tiles (scatter mode)
DW_BACKENDS = {
    "auto": PackedBackend(),
    "dense-buffer": PackedBackend(dw_tiles=None),
    "tiles4": PackedBackend(dw_tiles=(4, 4)),
    "tiles3x5": PackedBackend(dw_tiles=(3, 5)),
    "tiles4-chunk1": PackedBackend(dw_tiles=(4, 4), tile_chunk_floats=1),
    "tiles4-chunk2": PackedBackend(dw_tiles=(4, 4), tile_chunk_floats=1300),
    "whole": PackedBackend(dw_tiles=(64, 64)),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL, what: str = ""):
    """Relative error in norm, and elementwise relative to the largest magnitude."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double(), expected.detach().double()
    if e.numel() == 0:
        return
    scale = e.abs().max().item()
    if scale == 0.0:
        assert a.abs().max().item() <= 1e-12, f"{what}: expected zeros"
        return
    rel = ((a - e).norm() / e.norm()).item()
    worst = ((a - e).abs().max() / scale).item()
    assert rel <= tol and worst <= tol, f"{what}: relative error {rel:.2e}, worst element {worst:.2e}"


def random_mask(b, h, w, p=0.55, seed=0, empty_sample=None):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, h, w, generator=g) < p
    if empty_sample is not None:
        mask[empty_sample] = False
    return mask


def make_input(b=3, c=6, h=10, w=13, p=0.55, seed=0, empty_sample=1):
    """Masked input (zeros at inactive sites), its mask, and leaf rows for the packed backend."""
    g = torch.Generator().manual_seed(seed + 100)
    mask = random_mask(b, h, w, p, seed, empty_sample)
    x = torch.randn(b, c, h, w, generator=g) * mask.unsqueeze(1)
    return x, mask


def run_both(x, mask, op, backend=PACKED, stride=1):
    """Apply ``op(backend, native)`` on both backends to the same leaf data. Returns
    (dense output [B,C,H,W], packed output [B,C,H,W], dense leaf, packed leaf rows, packed tensor)."""
    xd = x.clone().requires_grad_(True)
    yd = op(DENSE, DENSE.from_dense(xd, mask, stride))
    tp = backend.from_dense(x, mask, stride)
    rows = tp.feats.detach().clone().requires_grad_(True)
    yp = op(backend, tp.replace(rows))
    return yd, yp, xd, rows, tp


def check_fwd_bwd(x, mask, op, params=(), backend=PACKED, seed=1, stride=1):
    """Forward equal, and grads w.r.t. params and input rows equal, for a random upstream gradient."""
    yd, yp, xd, rows, tp = run_both(x, mask, op, backend, stride)
    out_d, out_p = DENSE.to_dense(yd), backend.to_dense(yp)
    assert_close(out_p, out_d, what="forward")
    up = torch.randn(out_d.shape, generator=torch.Generator().manual_seed(seed))
    grads_d = torch.autograd.grad((out_d * up).sum(), [xd, *params])
    grads_p = torch.autograd.grad((out_p * up).sum(), [rows, *params])
    b, yy, xx = tp.geom.bxy()
    assert_close(grads_p[0], grads_d[0].permute(0, 2, 3, 1)[b, yy, xx], what="grad input")
    for i, (gp, gd) in enumerate(zip(grads_p[1:], grads_d[1:])):
        assert_close(gp, gd, what=f"grad param {i}")
    return out_d, out_p


# ------------------------------------------------------------------------------------------------
# entering and leaving
# ------------------------------------------------------------------------------------------------
def test_registered():
    assert isinstance(get_backend("packed"), PackedBackend)


def test_roundtrip_and_row_order():
    x, mask = make_input()
    sb = SparseBatch.from_dense(x, mask, stride=4)
    t = PACKED.from_sparse(sb)
    assert isinstance(t, PackedTensor)
    back = PACKED.to_sparse(t)
    assert torch.equal(back.coords, sb.coords) and torch.equal(back.feats, sb.feats)
    assert back.spatial_shape == (10, 13) and back.stride == 4 and back.batch_size == 3
    t2 = PACKED.from_dense(x, mask, 4)
    assert torch.equal(t2.coords, sb.coords) and torch.equal(t2.feats, sb.feats)
    assert torch.equal(PACKED.to_dense(t2), x)
    assert t2.geom.counts[1] == 0


def test_from_sparse_sorts_unsorted_rows():
    x, mask = make_input()
    sb = SparseBatch.from_dense(x, mask)
    perm = torch.randperm(sb.coords.shape[0], generator=torch.Generator().manual_seed(0))
    t = PACKED.from_sparse(SparseBatch(sb.coords[perm], sb.feats[perm], sb.batch_size, sb.spatial_shape))
    assert torch.equal(t.coords, sb.coords) and torch.equal(t.feats, sb.feats)


# ------------------------------------------------------------------------------------------------
# convolutions
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 7])
def test_conv_matches_dense_and_conv2d(k):
    x, mask = make_input(c=5)
    g = torch.Generator().manual_seed(k)
    weight = (torch.randn(4, 5, k, k, generator=g) * 0.2).requires_grad_(True)
    bias = torch.randn(4, generator=g).requires_grad_(True)
    out_d, out_p = check_fwd_bwd(x, mask, lambda be, t: be.conv(t, weight, bias), (weight, bias))
    ref = F.conv2d(x, weight, bias, padding=k // 2) * mask.unsqueeze(1)
    assert_close(out_p, ref, what="vs F.conv2d")


@pytest.mark.parametrize("mode", list(DW_BACKENDS))
@pytest.mark.parametrize("k", [1, 3, 7])
def test_dwconv_matches_dense_and_conv2d(k, mode):
    x, mask = make_input(c=6)
    g = torch.Generator().manual_seed(10 + k)
    weight = (torch.randn(6, 1, k, k, generator=g) * 0.2).requires_grad_(True)
    bias = torch.randn(6, generator=g).requires_grad_(True)
    backend = DW_BACKENDS[mode]
    out_d, out_p = check_fwd_bwd(x, mask, lambda be, t: be.dwconv(t, weight, bias), (weight, bias), backend)
    ref = F.conv2d(x, weight, bias, padding=k // 2, groups=6) * mask.unsqueeze(1)
    assert_close(out_p, ref, what="vs F.conv2d")


@pytest.mark.parametrize("ratio", [0.0, 0.6, 0.9])
def test_dwconv_patch_masks_all_tile_sizes(ratio):
    """Patch-aligned masks (the encoder's case) at stage-1 resolution, every tile size."""
    vis = random_patch_mask(2, (3, 4), ratio, torch.Generator().manual_seed(3))
    mask = upsample_mask(vis, 8)                                    # 24 x 32 map, 8 x 8 patches
    x = torch.randn(2, 8, 24, 32, generator=torch.Generator().manual_seed(4)) * mask.unsqueeze(1)
    g = torch.Generator().manual_seed(5)
    weight = (torch.randn(8, 1, 7, 7, generator=g) * 0.2).requires_grad_(True)
    bias = torch.randn(8, generator=g).requires_grad_(True)
    for mode in ["auto", None, (4, 4), (8, 8), (16, 16), (24, 32)]:
        for chunk in (TILE_CHUNK_FLOATS, 1):
            backend = PackedBackend(dw_tiles=mode, tile_chunk_floats=chunk)
            check_fwd_bwd(x, mask, lambda be, t: be.dwconv(t, weight, bias), (weight, bias), backend)


def test_dwconv_non_square_kernel():
    """Beyond the interface's k x k (the dense backend assumes square kernels): vs F.conv2d."""
    x, mask = make_input(c=4)
    weight = (torch.randn(4, 1, 3, 5, generator=torch.Generator().manual_seed(0)) * 0.2).requires_grad_(True)
    xd = x.clone().requires_grad_(True)
    ref = F.conv2d(xd, weight, None, padding=(1, 2), groups=4) * mask.unsqueeze(1)
    up = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    gx_ref, gw_ref = torch.autograd.grad((ref * up).sum(), [xd, weight])
    for mode, backend in DW_BACKENDS.items():
        t = backend.from_dense(x, mask)
        rows = t.feats.clone().requires_grad_(True)
        out = backend.to_dense(backend.dwconv(t.replace(rows), weight, None))
        assert_close(out, ref, what=f"{mode} forward")
        gx, gw = torch.autograd.grad((out * up).sum(), [rows, weight])
        b, yy, xx = t.geom.bxy()
        assert_close(gx, gx_ref.permute(0, 2, 3, 1)[b, yy, xx], what=f"{mode} grad input")
        assert_close(gw, gw_ref, what=f"{mode} grad weight")


def test_even_kernel_refused():
    x, mask = make_input(c=4)
    t = PACKED.from_dense(x, mask)
    with pytest.raises(ValueError, match="odd"):
        PACKED.dwconv(t, torch.randn(4, 1, 2, 2), None)


def test_dwconv_reuses_cached_plan_and_buffers():
    vis = random_patch_mask(2, (3, 4), 0.5, torch.Generator().manual_seed(3))
    mask = upsample_mask(vis, 8)
    x = torch.randn(2, 8, 24, 32) * mask.unsqueeze(1)
    t = PACKED.from_dense(x, mask)
    w = torch.randn(8, 1, 7, 7)
    y1 = PACKED.dwconv(t, w, None)
    keys = set(t.geom._cache)
    y2 = PACKED.dwconv(y1, w, None)                  # same geometry: nothing new is built
    assert set(t.geom._cache) == keys
    ref = PACKED.dwconv(PackedBackend(dw_tiles=None).dwconv(t, w, None), w, None)
    assert_close(y2.feats, ref.feats)


# ------------------------------------------------------------------------------------------------
# downsampling and the stem
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,aligned", [((12, 16), True), ((12, 16), False), ((11, 13), False)])
def test_downsample(shape, aligned):
    h, w = shape
    if aligned:   # whole 2 x 2 blocks, like the encoder's masks
        vis = random_mask(3, h // 2, w // 2, 0.5, seed=2, empty_sample=2)
        mask = upsample_mask(vis, 2)
    else:         # arbitrary sparsity (blocks with missing children), odd sizes (cropped border)
        mask = random_mask(3, h, w, 0.4, seed=2, empty_sample=2)
    x = torch.randn(3, 6, h, w, generator=torch.Generator().manual_seed(0)) * mask.unsqueeze(1)
    g = torch.Generator().manual_seed(1)
    weight = (torch.randn(9, 6, 2, 2, generator=g) * 0.2).requires_grad_(True)
    bias = torch.randn(9, generator=g).requires_grad_(True)
    out_d, out_p = check_fwd_bwd(x, mask, lambda be, t: downsample(be, t, weight, bias), (weight, bias), stride=4)
    active = F.max_pool2d(mask[:, : h // 2 * 2, : w // 2 * 2].unsqueeze(1).float(), 2) > 0
    assert_close(out_p, F.conv2d(x, weight, bias, stride=2) * active, what="vs F.conv2d")
    t = downsample(PACKED, PACKED.from_dense(x, mask, 4), weight, bias)
    assert t.stride == 8 and t.spatial_shape == (h // 2, w // 2)
    assert torch.equal(t.geom.active_mask(), active.squeeze(1))


@pytest.mark.parametrize("aligned", [True, False])
def test_patch_embed(aligned):
    img = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(0))
    if aligned:
        mask = upsample_mask(random_patch_mask(2, (3, 5), 0.5, torch.Generator().manual_seed(1)), 2)
    else:
        mask = random_mask(2, 6, 10, 0.5, seed=1)
    g = torch.Generator().manual_seed(2)
    weight = (torch.randn(5, 3, 4, 4, generator=g) * 0.2).requires_grad_(True)
    bias = torch.randn(5, generator=g).requires_grad_(True)
    td = DENSE.patch_embed(img, mask, weight, bias, 4)
    tp = PACKED.patch_embed(img, mask, weight, bias, 4)
    out_d, out_p = DENSE.to_dense(td), PACKED.to_dense(tp)
    assert tp.stride == 4 and tp.spatial_shape == (6, 10)
    assert_close(out_p, out_d, what="forward")
    assert_close(out_p, F.conv2d(img, weight, bias, stride=4) * mask.unsqueeze(1), what="vs F.conv2d")
    up = torch.randn(out_d.shape, generator=g)
    for gp, gd in zip(torch.autograd.grad((out_p * up).sum(), [weight, bias]),
                      torch.autograd.grad((out_d * up).sum(), [weight, bias])):
        assert_close(gp, gd, what="grad")


# ------------------------------------------------------------------------------------------------
# per-site and per-sample ops
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("uniform", [True, False])
def test_grn(uniform):
    if uniform:   # the same number of sites per sample: the [B, n, C] fast path
        vis = random_patch_mask(3, (3, 4), 0.5, torch.Generator().manual_seed(0))
        mask = upsample_mask(vis, 2)
    else:         # different counts, one sample without any site
        mask = random_mask(3, 6, 8, 0.5, seed=0, empty_sample=1)
    x = torch.randn(3, 16, 6, 8, generator=torch.Generator().manual_seed(1)) * mask.unsqueeze(1)
    x[0, 3] = 0.0                                   # an all-zero channel: norm 0, no NaN
    grn = _grn(16)
    t = PACKED.from_dense(x, mask)
    assert (t.geom.uniform is not None) == uniform
    check_fwd_bwd(x, mask, lambda be, t: grn(t, be), (grn.weight, grn.bias))


def _grn(c, seed=2):
    """The model's GRN with random parameters (zero-initialised ones would hide the normalisation)."""
    grn = GRN(c)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        grn.weight.copy_(torch.randn(c, generator=g)), grn.bias.copy_(torch.randn(c, generator=g))
    return grn


def test_grn_statistics_are_per_sample():
    x, mask = make_input(b=3, c=8, empty_sample=None)
    grn = _grn(8)
    out = PACKED.to_dense(grn(PACKED.from_dense(x, mask), PACKED))
    x2 = x.clone()
    x2[2] *= 5.0                                    # another sample changes...
    out2 = PACKED.to_dense(grn(PACKED.from_dense(x2, mask), PACKED))
    assert torch.allclose(out[:2], out2[:2])        # ...this one does not
    assert not torch.allclose(out[2], out2[2])


def test_map_feats_add_scale_samples():
    x, mask = make_input(c=6)
    lin = torch.nn.Linear(6, 6)
    ln = torch.nn.LayerNorm(6)
    scale = torch.tensor([0.0, 2.0, 0.5])
    scale_bc, shift = torch.randn(3, 6, requires_grad=True), torch.randn(6, requires_grad=True)

    def op(be, t):
        u = be.map_feats(t, lambda f: F.gelu(lin(ln(f))))
        return be.add(t, be.scale_samples(be.scale_samples(u, scale), scale_bc, shift))

    params = (lin.weight, lin.bias, ln.weight, scale_bc, shift)
    check_fwd_bwd(x, mask, op, params)
    vis = upsample_mask(random_patch_mask(3, (3, 4), 0.5, torch.Generator().manual_seed(0)), 2)
    x2 = torch.randn(3, 6, 6, 8) * vis.unsqueeze(1)
    check_fwd_bwd(x2, vis, op, params)     # uniform counts path


def test_geometry_down_indices():
    mask = random_mask(2, 7, 9, 0.5, seed=5)
    geom = PackedGeometry.from_mask(mask, 4)
    child, child_idx, parent_idx, complete, covered = geom.down(2)
    assert geom.down(2)[0] is child                 # cached: computed once per stage
    n = geom.num_rows
    real = child_idx < n
    assert torch.equal(parent_idx[child_idx[real]], torch.arange(child_idx.numel())[real])
    assert not covered                              # odd sizes: border rows have no parent


# ------------------------------------------------------------------------------------------------
# whole model
# ------------------------------------------------------------------------------------------------
def _randomize(module: torch.nn.Module, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight") or name.endswith("stem_norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))   # GRN weights included (init 0)


@pytest.mark.parametrize("ratio", [0.0, 0.6])
def test_encoder_matches_dense(ratio):
    torch.manual_seed(0)
    dense = SparseConvNeXtV2.from_name("convnextv2_atto", backend="dense")
    _randomize(dense)
    packed = copy.deepcopy(dense)
    packed.backend = "packed"
    img = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    vis = random_patch_mask(2, (2, 3), ratio, torch.Generator().manual_seed(2))
    out_d, out_p = dense(img, vis), packed(img, vis)
    assert out_p.shape == (2, 320, 2, 3)
    assert_close(out_p, out_d, what="encoder output")
    up = torch.randn(out_d.shape, generator=torch.Generator().manual_seed(3))
    (out_d * up).sum().backward()
    (out_p * up).sum().backward()
    for (name, pd), (_, pp) in zip(dense.named_parameters(), packed.named_parameters()):
        assert_close(pp.grad, pd.grad, what=name)
    stages_d = dense.forward_sparse(img, vis, return_stages=True)
    stages_p = packed.forward_sparse(img, vis, return_stages=True)
    for i, (sd, sp) in enumerate(zip(stages_d, stages_p)):
        assert_close(PACKED.to_dense(sp), DENSE.to_dense(sd), what=f"stage {i}")


def _fcmae_pair(cfg, batch):
    """A randomised FCMAE on the dense backend, its copy on packed, a non-square batch and its mask."""
    torch.manual_seed(0)
    dense = build_fcmae(cfg, "dense")
    _randomize(dense, seed=4)
    packed = copy.deepcopy(dense)
    packed.encoder.backend = "packed"
    img = torch.randn(batch, 3, 64, 96, generator=torch.Generator().manual_seed(5))
    return dense, packed, img, dense.make_mask(img, torch.Generator().manual_seed(6))


def test_fcmae_loss_and_grads_match_dense():
    cfg = PretrainConfig()
    _check_same_loss_and_grads(*_fcmae_pair(cfg, batch=2))


def _check_same_loss_and_grads(dense, packed, img, vis, **packed_kwargs):
    loss_d, pred_d, _ = dense(img, vis)
    loss_p, pred_p, _ = packed(img, vis, **packed_kwargs)
    assert_close(loss_p, loss_d, what="loss")
    assert_close(pred_p, pred_d, what="predictions")
    loss_d.backward()
    loss_p.backward()
    for (name, pd), (_, pp) in zip(dense.named_parameters(), packed.named_parameters()):
        assert_close(pp.grad, pd.grad, what=name)


@pytest.mark.parametrize("decoder", ["fcmae", "spark"])
def test_static_mode_matches_dense(decoder):
    """num_visible given (static, sync-free indices; plain-torch ops): the dense backend's loss,
    predictions and gradients, on a non-square image; the spark decoder reads every stage."""
    cfg = PretrainConfig(model=ModelConfig(decoder=decoder, decoder_dim=64))
    dense, packed, img, vis = _fcmae_pair(cfg, batch=3)
    _check_same_loss_and_grads(dense, packed, img, vis, num_visible=packed.visible_count(vis.shape[1:]))


def test_static_geometry_equals_general():
    """The sort-based indices are nonzero()'s, at every stage (down() included)."""
    vis = random_patch_mask(3, (3, 4), 0.6, torch.Generator().manual_seed(1))
    n = int(vis[0].sum())
    active = upsample_mask(vis, 8)
    static = PackedGeometry.from_mask_static(active, 4, n * 64)
    general = PackedGeometry.from_mask(active, 4)
    for _ in range(3):
        assert static.static and torch.equal(static.coords, general.coords)
        assert torch.equal(static.flat, general.flat) and static.counts == general.counts
        (static, s_idx, *_), (general, g_idx, *_) = static.down(2), general.down(2)
        assert torch.equal(s_idx, g_idx)


def test_static_mode_refuses_a_wrong_count():
    model = SparseConvNeXtV2.from_name("convnextv2_atto", backend="packed")
    img = torch.randn(2, 3, 64, 64)
    vis = random_patch_mask(2, (2, 2), 0.5, torch.Generator().manual_seed(0))
    vis[1, 0, 0] = ~vis[1, 0, 0]
    with pytest.raises(RuntimeError, match="every sample must have exactly 128 active sites at stride 4; pass "
                                           "num_visible=None for masks with varying counts"):
        model(img, vis, num_visible=2)
    with pytest.raises(ValueError, match=r"rows_per_sample=0 must be in \[1, 256\]"):
        model(img, vis, num_visible=0)


@pytest.mark.parametrize("mode", ["auto", None, (4, 4), (8, 8), (4, 8)])
@pytest.mark.parametrize("chunk", [TILE_CHUNK_FLOATS, 1])
def test_static_dwconv_matches_conv2d(mode, chunk):
    """Static mode's depthwise conv, from a patch-aligned mask with a fixed count (the encoder's case):
    halo tiles sized from the known block (no sync), or the dense map with the per-plane weight
    gradient, vs F.conv2d on the masked map, forward and all three gradients; non-square map, k=7."""
    vis = random_patch_mask(3, (3, 4), 0.6, torch.Generator().manual_seed(7))
    mask = upsample_mask(vis, 8)                                    # 24 x 32 map of whole 8 x 8 blocks
    geom = PackedGeometry.from_mask_static(mask, 4, int(mask[0].sum()), block=8)
    backend = PackedBackend(dw_tiles=mode, tile_chunk_floats=chunk)
    expect_tiles = {"auto": (8, 8), None: None, (4, 4): (4, 4), (8, 8): (8, 8), (4, 8): None}[mode]
    assert backend.choose_tile_static(geom, 7, 7) == expect_tiles
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 6, 24, 32, generator=g) * mask.unsqueeze(1)
    weight = (torch.randn(6, 1, 7, 7, generator=g) * 0.2).requires_grad_(True)
    bias = torch.randn(6, generator=g).requires_grad_(True)
    b, yy, xx = geom.bxy()
    rows = x.permute(0, 2, 3, 1)[b, yy, xx].clone().requires_grad_(True)
    out = backend.to_dense(backend.dwconv(PackedTensor(rows, geom), weight, bias))
    xd = x.clone().requires_grad_(True)
    ref = F.conv2d(xd, weight, bias, padding=3, groups=6) * mask.unsqueeze(1)
    assert_close(out, ref, what="forward")
    up = torch.randn(ref.shape, generator=g)
    grads = torch.autograd.grad((out * up).sum(), [rows, weight, bias])
    grads_ref = torch.autograd.grad((ref * up).sum(), [xd, weight, bias])
    assert_close(grads[0], grads_ref[0].permute(0, 2, 3, 1)[b, yy, xx], what="grad input")
    assert_close(grads[1], grads_ref[1], what="grad weight")
    assert_close(grads[2], grads_ref[2], what="grad bias")


def test_static_tiles_follow_the_block_through_downsampling():
    """The encoder promises whole patches (block 8 at stride 4); each 2x2 downsample halves it, and
    tiles are only ever sized from what is promised (never from a count that merely divides)."""
    vis = random_patch_mask(2, (7, 7), 0.6, torch.Generator().manual_seed(2))
    geom = PackedGeometry.from_mask_static(upsample_mask(vis, 8), 4, int(vis[0].sum()) * 64, block=8)
    blocks, tiles = [], []
    for _ in range(4):
        blocks.append(geom.block)
        tiles.append(PackedBackend(dw_tiles=(4, 4)).choose_tile_static(geom, 7, 7))
        geom = geom.down(2)[0] if geom.spatial_shape[0] > 7 else geom
    assert blocks == [8, 4, 2, 1] and tiles == [(4, 4), (4, 4), None, None]
    unknown = PackedGeometry.from_mask_static(upsample_mask(vis, 8), 4, int(vis[0].sum()) * 64)  # block 1
    assert PackedBackend(dw_tiles=(8, 8)).choose_tile_static(unknown, 7, 7) is None


def test_static_tiles_refuse_a_mask_that_breaks_the_promised_blocks():
    """A fixed count that is not made of whole blocks fails the device-side tile count check."""
    mask = torch.zeros(2, 16, 16, dtype=torch.bool)
    mask[:, :8, :8] = True
    mask[1, 0, 0], mask[1, 8, 8] = False, True                      # same count, block 8 broken
    geom = PackedGeometry.from_mask_static(mask, 4, 64, block=8)
    rows = torch.randn(geom.num_rows, 4)
    weight = torch.randn(4, 1, 7, 7)
    with pytest.raises(RuntimeError, match="not whole 8x8 tiles"):
        PackedBackend(dw_tiles=(8, 8)).dwconv(PackedTensor(rows, geom), weight, None).feats.sum().item()


def test_encoder_bfloat16_runs():
    model = SparseConvNeXtV2.from_name("convnextv2_atto", backend="packed")
    _randomize(model)
    img = torch.randn(2, 3, 64, 64)
    vis = random_patch_mask(2, (2, 2), 0.5, torch.Generator().manual_seed(0))
    ref = model(img, vis)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(img, vis)
    out.float().sum().backward()
    assert torch.isfinite(out.float()).all()
    assert ((out.float() - ref).norm() / ref.norm()).item() < 0.1


def test_batch_without_any_site():
    x = torch.zeros(2, 4, 6, 8)
    mask = torch.zeros(2, 6, 8, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    dw = torch.randn(4, 1, 7, 7, generator=g).requires_grad_(True)
    down = torch.randn(5, 4, 2, 2, generator=g).requires_grad_(True)
    grn = _grn(4)

    def op(be, t):
        return downsample(be, grn(be.dwconv(t, dw, None), be), down, None)

    check_fwd_bwd(x, mask, op, (dw, grn.weight, grn.bias, down))


# ---- SparK's ResNet: sparse-cost convs and static mode ------------------------------------------------
def test_static_resnet_equals_the_general_path_in_float64():
    """resnet18 with ``num_visible`` (every geometry static: the stem's pixel sites, the strided convs'
    and max pool's output sites from the geometry's own downsampling, BatchNorm over the rows) gives
    the general path's stages, gradients and BatchNorm running statistics, in training mode."""
    from mimsparse.models.resnet import SparseResNet

    torch.manual_seed(0)
    general = SparseResNet.from_name("resnet18", backend="packed").double()
    static = copy.deepcopy(general)
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    vis = random_patch_mask(2, (2, 3), 0.5, torch.Generator().manual_seed(1))
    outs = []
    for model, n in ((general, None), (static, int(vis[0].sum()))):
        feats = model.forward_hierarchical(x, vis, num_visible=n)
        sum((f * torch.linspace(-1, 1, f.numel(), dtype=f.dtype).view_as(f)).sum() for f in feats).backward()
        outs.append(feats)
    for a, b in zip(*outs):
        assert_close(a, b, 1e-12, "stage")
    for (name, p), q in zip(static.named_parameters(), general.parameters()):
        assert_close(p.grad, q.grad, 1e-10, name)
    for (name, buf), ref in zip(static.named_buffers(), general.buffers()):
        assert_close(buf.double(), ref.double(), 1e-12, name)


def test_static_strided_ops_refuse_output_sites_other_than_the_next_stage():
    """In static mode a strided op's output sites come from the geometry; a caller's mask that differs
    is refused by the device-side check (an error at the next sync), a wrong grid at once."""
    vis = random_patch_mask(2, (2, 2), 0.5, torch.Generator().manual_seed(0))
    geom = PackedGeometry.from_mask_static(upsample_mask(vis, 8), 4, int(vis[0].sum()) * 64, block=8)
    t = PackedTensor(torch.randn(geom.num_rows, 3), geom)
    backend, weight = PackedBackend(), torch.randn(4, 3, 3, 3)
    right = upsample_mask(vis, 4)
    assert torch.equal(backend.to_sparse(backend.max_pool(t, 3, 2, right)).active_mask(), right)
    with pytest.raises(RuntimeError, match="the output sites of a strided op must be the next stage's patches"):
        backend.strided_conv(t, weight, None, 2, padding=1, active_out_bhw=~right)
    with pytest.raises(ValueError, match=r"output mask \(2, 9, 9\) does not match the output grid \(2, 8, 8\)"):
        backend.max_pool(t, 3, 2, torch.ones(2, 9, 9, dtype=torch.bool))


def test_gather_conv_window_tables_are_built_once_per_geometry():
    """The 3x3 convs of a stage share one pair of window tables, and a block's strided conv and its 1x1
    shortcut share one output geometry (what ``add`` needs, and fewer index builds). The inverse table,
    which only the input gradient reads, is built only for inputs that need one."""
    vis = random_patch_mask(2, (2, 2), 0.5, torch.Generator().manual_seed(0))
    backend = PackedBackend(conv_impl="gather")
    t = backend.from_dense(torch.randn(2, 8, 16, 16, requires_grad=True), upsample_mask(vis, 8), 4)
    w3 = torch.randn(8, 8, 3, 3)
    a, b = backend.conv(t, w3, None), backend.conv(t, w3, None)
    assert a.geom is t.geom and {k for k in t.geom._cache if k[0] in ("win", "inv")} == {("win", 3, 1, 1),
                                                                                        ("inv", 3, 1, 1)}
    out_mask = upsample_mask(vis, 4)
    main = backend.strided_conv(b, w3, None, 2, padding=1, active_out_bhw=out_mask)
    short = backend.strided_conv(t, torch.randn(8, 8, 1, 1), None, 2, padding=0, active_out_bhw=out_mask)
    assert main.geom is short.geom and backend.add(main, short).feats.shape == main.feats.shape
    image = backend.from_dense(torch.randn(2, 3, 16, 16), upsample_mask(vis, 8), 4)  # no gradient wanted
    backend.conv(image, torch.randn(8, 3, 3, 3), None)
    assert ("win", 3, 1, 1) in image.geom._cache and ("inv", 3, 1, 1) not in image.geom._cache


@pytest.mark.parametrize("c_out", [3, 40])
@pytest.mark.parametrize("k,stride,padding", [(3, 1, 1), (3, 2, 1), (1, 2, 0)])
def test_gather_conv_both_window_layouts_equal_conv2d(k, stride, padding, c_out):
    """The gather-GEMM lays its windows out taps-major when there are more output rows than output
    channels (C_out 3 here) and channels-major otherwise (C_out 40 > M): forward and all gradients
    against F.conv2d either way, strided outputs included (whose inputs are read by 0-4 windows)."""
    active = random_active(2, 7, 9, 0.5, seed=k + stride, empty_sample=1)
    ho, wo = (7 + 2 * padding - k) // stride + 1, (9 + 2 * padding - k) // stride + 1
    active_out = random_active(2, ho, wo, 0.6, seed=7) if stride > 1 else None
    m = int((active if active_out is None else active_out).sum())
    assert (m < c_out) == (c_out == 40)  # both layouts are exercised
    x, w, b = torch.randn(2, 6, 7, 9), torch.randn(c_out, 6, k, k), torch.randn(c_out)
    check_conv_against_conv2d(PackedBackend(conv_impl="gather"), x, active, w, b, stride, padding, active_out, TOL)


# ---- halo tiles for full k x k convs (tile_conv.py) -------------------------------------------------
@pytest.mark.parametrize("k,stride,padding", [(3, 1, 1), (5, 1, 2), (3, 2, 1), (7, 2, 3)])
def test_tile_conv_equals_conv2d_on_patch_masks(k, stride, padding):
    """ResNet's convs on a patch mask (4x4 output blocks at stride 1, 8x8 at stride 2, a map that is not a
    whole number of blocks, an all-masked sample): ``auto`` takes halo tiles on CPU, and they equal
    F.conv2d forward and backward."""
    vis = random_patch_mask(3, (3, 4), 0.5, torch.Generator().manual_seed(k))
    vis[1] = False
    s = 4 * stride
    ho, wo = 3 * s, 4 * s - 1                              # partial blocks at the right border
    active = upsample_mask(vis, s * stride)[:, :ho * stride, :wo * stride]
    x, wt, b = torch.randn(3, 5, ho * stride, wo * stride), torch.randn(6, 5, k, k), torch.randn(6)
    active_out = None if stride == 1 else upsample_mask(vis, s)[:, :ho, :wo]
    g_out = PackedGeometry.from_mask(active if active_out is None else active_out, stride)
    assert PACKED.conv_plan(PackedGeometry.from_mask(active, 1), g_out, k, stride) == ("tiles", s)
    check_conv_against_conv2d(PACKED, x, active, wt, b, stride, padding, active_out, TOL)


@pytest.mark.parametrize("s", [1, 2, 4])
@pytest.mark.parametrize("k,stride,padding", [(3, 1, 1), (3, 2, 1)])
def test_tile_conv_is_exact_for_any_sites(s, k, stride, padding):
    """tile_conv itself on scattered sites (partly filled tiles, windows reaching into empty tiles and
    past the border), for any tile size, against F.conv2d."""
    from mimsparse.backends.packed.tile_conv import conv_tile_index, tile_conv

    active = random_active(2, 9, 13, 0.4, seed=s)
    ho, wo = (9 + 2 * padding - k) // stride + 1, (13 + 2 * padding - k) // stride + 1
    active_out = random_active(2, ho, wo, 0.5, seed=s + 10) if stride > 1 else active
    x, w, b = torch.randn(2, 4, 9, 13, requires_grad=True), torch.randn(3, 4, k, k, requires_grad=True), torch.randn(3)
    g_in, g_out = PackedGeometry.from_mask(active, 1), PackedGeometry.from_mask(active_out, stride)
    rows = g_in.gather(x)
    out = tile_conv(rows, w, b, conv_tile_index(g_in, g_out, s, k, stride, padding), stride)
    ref = F.conv2d(x * active[:, None], w, b, stride=stride, padding=padding)
    ref_rows = g_out.gather(ref)
    assert rel_err(out, ref_rows) < TOL
    gy = torch.randn(out.shape)
    gx, gw = torch.autograd.grad((out * gy).sum(), (x, w))
    rx, rw = torch.autograd.grad((ref_rows * gy).sum(), (x, w))
    assert rel_err(gx, rx) < TOL and rel_err(gw, rw) < TOL


@pytest.mark.parametrize("s", [1, 2, 4])
def test_tile_max_pool_is_exact_for_any_sites(s):
    """The 3x3 stride-2 max pool over halo tiles, on scattered sites (windows with no active site give
    0, tiles partly filled), for any tile size: forward and input gradient against F.max_pool2d with
    -inf at inactive sites."""
    from mimsparse.backends.packed.tile_conv import conv_tile_index, tile_max_pool

    active = random_active(2, 9, 13, 0.3, seed=s)
    active_out = random_active(2, 5, 7, 0.6, seed=s + 10)
    x = torch.randn(2, 4, 9, 13, requires_grad=True)
    g_in, g_out = PackedGeometry.from_mask(active, 1), PackedGeometry.from_mask(active_out, 2)
    out = tile_max_pool(g_in.gather(x), conv_tile_index(g_in, g_out, s, 3, 2, 1), 3, 2)
    pooled = F.max_pool2d(x.masked_fill(~active[:, None], float("-inf")), 3, 2, padding=1)
    ref = g_out.gather(pooled.nan_to_num(0.0, neginf=0.0))
    assert (ref == 0).any() and rel_err(out, ref) < TOL
    gy = torch.randn(out.shape)
    gx, = torch.autograd.grad((out * gy).sum(), x)
    rx, = torch.autograd.grad((ref * gy).sum(), x)
    assert rel_err(gx, rx) < TOL


def test_max_pool_on_patch_masks_takes_tiles():
    """ResNet's max pool after the stem (16x16 blocks pooled to 8x8): the plan picks tiles, and the
    backend's pool equals the masked-dense one forward and backward."""
    vis = random_patch_mask(3, (3, 3), 0.5, torch.Generator().manual_seed(2))
    vis[1] = False
    active, active_out = upsample_mask(vis, 16), upsample_mask(vis, 8)
    g_in, g_out = PackedGeometry.from_mask(active, 2), PackedGeometry.from_mask(active_out, 4)
    assert PACKED.conv_plan(g_in, g_out, 3, 2) == ("tiles", 8)
    x = torch.randn(3, 5, 48, 48)
    outs, grads = [], []
    for backend in (PACKED, DENSE):
        leaf = x.clone().requires_grad_()
        outs.append(backend.to_dense(backend.max_pool(backend.from_dense(leaf, active), 3, 2, active_out)))
        (outs[-1] * torch.arange(outs[-1].numel()).view(outs[-1].shape).sin()).sum().backward()
        grads.append(leaf.grad)
    assert rel_err(outs[0], outs[1]) < TOL and rel_err(grads[0], grads[1]) < TOL


def test_conv_plan_chooses_by_block_size_and_impl():
    """Auto on CPU: tiles for output blocks of >= 4x4 sites at stride 1 and >= 8x8 at stride 2, the
    gather below, the gather for strided 1x1 convs; scattered sites never fill tiles; forced impls are
    honoured."""
    vis = random_patch_mask(2, (4, 4), 0.5, torch.Generator().manual_seed(0))
    g16, g8, g4, g2 = (PackedGeometry.from_mask(upsample_mask(vis, s), 1) for s in (16, 8, 4, 2))
    assert PACKED.conv_plan(g8, g8, 3, 1) == ("tiles", 8)
    assert PACKED.conv_plan(g4, g4, 3, 1) == ("tiles", 4)
    assert PACKED.conv_plan(g2, g2, 3, 1) == ("gather", None)
    assert PACKED.conv_plan(g16, g8, 7, 2) == ("tiles", 8)
    assert PACKED.conv_plan(g8, g4, 3, 2) == ("gather", None)    # 4x4 output blocks at stride 2
    assert PACKED.conv_plan(g8, g2, 1, 2) == ("gather", None)
    scattered = PackedGeometry.from_mask(random_active(2, 32, 32, 0.3, seed=1), 1)
    assert PACKED.conv_plan(scattered, scattered, 3, 1) == ("gather", None)
    assert PackedBackend(conv_impl="tiles").conv_plan(g2, g2, 3, 1) == ("tiles", 2)
    assert PackedBackend(conv_impl="tiles").conv_plan(g8, g2, 3, 2) == ("tiles", 2)
    assert PackedBackend(conv_impl="gather").conv_plan(g8, g8, 3, 1) == ("gather", None)
    assert PackedBackend(conv_impl="dense").conv_plan(g8, g8, 3, 1) == ("dense", None)
    assert PackedBackend(conv_impl="dense").conv_plan(g8, g2, 3, 2) == ("gather", None)
    static = PackedGeometry.from_mask_static(upsample_mask(vis, 8), 1, 8 * 64, block=8)
    assert PACKED.conv_plan(static, static, 3, 1) == ("tiles", 8)
