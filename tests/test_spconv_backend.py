"""The spconv backend against the masked-dense reference backend and plain torch (CPU)."""
import copy

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("spconv.pytorch", reason="spconv is not installed (pip install spconv-cu120, or `make setup`)")

from mimsparse.backends import get_backend  # noqa: E402
from mimsparse.backends import spconv as spconv_backend  # noqa: E402
from mimsparse.backends.spconv import ConvAlgo, SpconvBackend, SpconvTensor  # noqa: E402
from mimsparse.encoder import SparseConvNeXtV2  # noqa: E402
from mimsparse.sparse import SparseBatch  # noqa: E402
from tests.helpers import random_active, randomize_, rel_err  # noqa: E402

pytestmark = pytest.mark.spconv

TOL = 1e-4
dense = get_backend("dense")
sparse = get_backend("spconv")
rulebook = SpconvBackend(dwconv="rulebook")


def _masked(x, active):
    return x * active.unsqueeze(1)


def _run_both(op, backend, x, active, weight, bias):
    """Apply ``op`` with ``backend`` and with the dense backend on copies of the same leaves; return
    (out, ref, [(grad, ref_grad) for x, weight, bias])."""
    leaves = [x.clone().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_()]
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    t = getattr(backend, op)(backend.from_dense(leaves[0], active), leaves[1], leaves[2])
    t_ref = getattr(dense, op)(dense.from_dense(ref_leaves[0], active), ref_leaves[1], ref_leaves[2])
    out, ref = backend.to_dense(t), dense.to_dense(t_ref)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7))
    (out * g).sum().backward()
    (ref * g).sum().backward()
    return t, out, ref, [(a.grad, r.grad) for a, r in zip(leaves, ref_leaves)]


@pytest.mark.parametrize("k", [1, 3, 7])
def test_conv_equals_dense_and_conv2d(k):
    x = torch.randn(3, 6, 9, 13)
    active = random_active(3, 9, 13, 0.4, seed=k, empty_sample=1)
    w, b = torch.randn(5, 6, k, k), torch.randn(5)
    t, out, ref, grads = _run_both("conv", sparse, x, active, w, b)
    assert isinstance(t, SpconvTensor) and t.stride == 1
    assert rel_err(out, ref) < TOL
    assert rel_err(out, _masked(F.conv2d(_masked(x, active), w, b, padding=k // 2), active)) < TOL
    assert torch.equal(sparse.to_sparse(t).active_mask(), active)
    for grad, ref_grad in grads:
        assert rel_err(grad, ref_grad) < TOL


@pytest.mark.parametrize("backend", [sparse, rulebook], ids=["dense-dw", "rulebook-dw"])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_dwconv_equals_dense_and_grouped_conv2d(backend, k):
    x = torch.randn(3, 8, 10, 7)
    active = random_active(3, 10, 7, 0.5, seed=10 + k, empty_sample=2)
    w, b = torch.randn(8, 1, k, k), torch.randn(8)
    _, out, ref, grads = _run_both("dwconv", backend, x, active, w, b)
    assert rel_err(out, ref) < TOL
    assert rel_err(out, _masked(F.conv2d(_masked(x, active), w, b, padding=k // 2, groups=8), active)) < TOL
    for grad, ref_grad in grads:
        assert rel_err(grad, ref_grad) < TOL


@pytest.mark.parametrize("k,shape", [(2, (8, 12)), (2, (9, 13)), (3, (9, 12))])
def test_downsample_equals_dense(k, shape):
    h, w = shape
    x = torch.randn(3, 4, h, w)
    active = random_active(3, h, w, 0.3, seed=5, empty_sample=0)
    weight, b = torch.randn(7, 4, k, k), torch.randn(7)
    t, out, ref, grads = _run_both("downsample", sparse, x, active, weight, b)
    ref_t = dense.downsample(dense.from_dense(x, active), weight, b)
    sb = sparse.to_sparse(t)
    assert t.stride == k and sb.stride == k and sb.spatial_shape == (h // k, w // k)
    assert torch.equal(sb.active_mask(), ref_t.active_bhw)
    # rows in (batch, raster) order, and each row's coordinates carry its own features
    b_, y_, x_ = sb.coords.long().unbind(1)
    flat = (b_ * (h // k) + y_) * (w // k) + x_
    assert torch.equal(flat, flat.sort().values)
    assert rel_err(sb.feats, ref.permute(0, 2, 3, 1)[b_, y_, x_]) < TOL
    assert rel_err(out, ref) < TOL
    for grad, ref_grad in grads:
        assert rel_err(grad, ref_grad) < TOL


def test_downsample_of_sites_only_in_a_partial_block_is_empty():
    sb = SparseBatch(torch.tensor([[0, 2, 1], [1, 0, 2]], dtype=torch.int32), torch.randn(2, 4), 2, (3, 3))
    weight = torch.randn(5, 4, 2, 2, requires_grad=True)
    t = sparse.downsample(sparse.from_sparse(sb), weight, torch.randn(5))
    assert t.features.shape == (0, 5) and t.spatial_shape == (1, 1)
    sparse.to_dense(t).sum().backward()


def test_grn_is_per_sample():
    torch.manual_seed(0)
    x = torch.randn(3, 16, 6, 5)
    active = random_active(3, 6, 5, 0.5, seed=2, empty_sample=1)
    weight, bias = torch.randn(16), torch.randn(16)
    out = sparse.to_dense(sparse.grn(sparse.from_dense(x, active), weight, bias))
    ref = dense.to_dense(dense.grn(dense.from_dense(x, active), weight, bias))
    assert rel_err(out, ref) < TOL
    # sample 0 alone gives the same answer: no statistic crosses samples
    alone = sparse.to_dense(sparse.grn(sparse.from_dense(x[:1], active[:1]), weight, bias))
    assert rel_err(out[:1], alone) < TOL


def test_all_masked_batch_has_no_rows_and_backpropagates():
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    active = torch.zeros(2, 6, 6, dtype=torch.bool)
    w_dw, w_c, w_d = (torch.randn(*s, requires_grad=True) for s in ((4, 1, 7, 7), (4, 4, 3, 3), (8, 4, 2, 2)))
    for backend in (sparse, rulebook):
        t = backend.from_dense(x, active)
        assert t.features.shape == (0, 4)
        y = backend.conv(backend.dwconv(t, w_dw, None), w_c, torch.zeros(4))
        y = backend.downsample(y, w_d, torch.zeros(8))
        assert y.features.shape == (0, 8) and y.spatial_shape == (3, 3) and y.stride == 2
        assert backend.to_dense(y).abs().sum() == 0
        backend.to_dense(y).sum().backward()
    assert x.grad.abs().sum() == 0 and w_d.grad.abs().sum() == 0


def _encoder_pair(seed=0, **kwargs):
    enc = randomize_(SparseConvNeXtV2.from_name("convnextv2_atto", backend="dense", **kwargs), seed=seed, std=0.1)
    enc_sp = copy.deepcopy(enc)
    enc_sp.backend = "spconv"
    return enc, enc_sp


def _visible(b, h, w, seed):
    visible = random_active(b, h, w, 0.5, seed=seed)
    visible[0, 0, 0] = True
    visible[-1] = False  # one sample with every patch masked
    return visible




def test_encoder_stages_equal_dense_with_rulebook_dwconv():
    enc, enc_sp = _encoder_pair(seed=5)
    enc_sp.backend = rulebook
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    visible = _visible(2, 2, 2, seed=6)
    with torch.no_grad():
        ref = enc.forward_sparse(x, visible, return_stages=True)
        out = enc_sp.forward_sparse(x, visible, return_stages=True)
    for i, (a, r) in enumerate(zip(out, ref)):
        assert a.stride == r.stride == 4 * 2 ** i
        assert rel_err(rulebook.to_dense(a), r.x_bchw) < TOL, f"stage {i}"






def test_rule_tables_are_built_once_per_stage(monkeypatch):
    calls = []
    original = spconv_backend.spops.get_indice_pairs

    def counting(indices, batch_size, shape, algo, ksize, stride, padding, dilation, out_padding, subm, *a, **kw):
        calls.append((tuple(shape), ksize[0], subm))
        return original(indices, batch_size, shape, algo, ksize, stride, padding, dilation, out_padding, subm, *a, **kw)

    monkeypatch.setattr(spconv_backend.spops, "get_indice_pairs", counting)
    enc = SparseConvNeXtV2.from_name("convnextv2_atto", backend=rulebook)
    visible = torch.ones(2, 2, 2, dtype=torch.bool)
    with torch.no_grad():
        enc(torch.randn(2, 3, 64, 64), visible)
    # one 7x7 submanifold table per stage (shared by its 2-6 blocks) + one table per downsample
    assert sorted(calls) == sorted([((16, 16), 7, True), ((16, 16), 2, False), ((8, 8), 7, True),
                                    ((8, 8), 2, False), ((4, 4), 7, True), ((4, 4), 2, False),
                                    ((2, 2), 7, True)])


def test_non_contiguous_coords_are_read_correctly():
    # Tensor.nonzero() returns column-major indices, which spconv would silently misread
    x = torch.randn(2, 3, 7, 9)
    active = random_active(2, 7, 9, 0.5, seed=3)
    sb = SparseBatch.from_dense(x, active)
    coords_t = sb.coords.t().contiguous().t()
    assert not coords_t.is_contiguous()
    w = torch.randn(4, 3, 3, 3)
    out = sparse.to_dense(sparse.conv(sparse.from_sparse(SparseBatch(coords_t, sb.feats, 2, (7, 9))), w, None))
    assert rel_err(out, _masked(F.conv2d(_masked(x, active), w, padding=1), active)) < TOL


def test_unsupported_dtypes_are_refused_clearly():
    x = torch.randn(1, 4, 5, 5)
    active = random_active(1, 5, 5, 0.5, seed=0)
    for dtype in (torch.bfloat16, torch.float16):
        with pytest.raises(TypeError, match=rf"spconv backend does not support {str(dtype)[6:]} on cpu; supported: float32"):
            sparse.from_dense(x.to(dtype), active)
    with pytest.raises(TypeError, match="does not support bfloat16 on cuda; supported: float32, float16"):
        sparse.check_dtype(torch.bfloat16, torch.device("cuda"))
    sparse.check_dtype(torch.float16, torch.device("cuda"))
    t = sparse.from_dense(x, active)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="bfloat16"):
        sparse.dwconv(t, torch.randn(4, 1, 3, 3), None)


def test_bad_coordinates_are_refused():
    feats = torch.randn(2, 3)
    for coords, match in (([[0, 0, 0], [0, 5, 1]], "outside the spatial shape"),
                          ([[0, 0, 0], [0, 1, -1]], "outside the spatial shape"),
                          ([[0, 0, 0], [2, 1, 1]], "batch index out of range"),
                          ([[0, 1, 2], [0, 1, 2]], "duplicate")):
        sb = SparseBatch(torch.tensor(coords, dtype=torch.int32), feats, 2, (5, 4))
        with pytest.raises(ValueError, match=match):
            sparse.from_sparse(sb)


def test_bad_weights_and_options_are_refused():
    t = sparse.from_dense(torch.randn(1, 4, 5, 5), random_active(1, 5, 5, 0.5, seed=0))
    with pytest.raises(ValueError, match="input channels"):
        sparse.conv(t, torch.randn(3, 5, 3, 3), None)
    with pytest.raises(ValueError, match="odd kernel"):
        sparse.dwconv(t, torch.randn(4, 1, 4, 4), None)
    with pytest.raises(ValueError, match="cannot downsample"):
        sparse.downsample(t, torch.randn(4, 4, 8, 8), None)
    with pytest.raises(ValueError, match="unknown spconv algorithm"):
        SpconvBackend(algo="fast")
    with pytest.raises(ValueError, match="unknown depthwise"):
        SpconvBackend(dwconv="grouped")


def test_self_check_passes_on_cpu_native():
    # the verification run on CUDA, exercised here on the CPU with the Native algorithm
    for k, stride, subm in ((3, 1, True), (7, 1, True), (2, 2, False)):
        err = sparse._check_algo(ConvAlgo.Native, torch.device("cpu"), torch.float32, k, stride, subm, 5, 6)
        assert err < 1e-5


def test_cuda_algorithm_selection_falls_back_and_caches(monkeypatch):
    backend = SpconvBackend(algo="mask_implicit_gemm")
    checked = []

    def fake_check(algo, device, dtype, k, stride, subm, c_in, c_out):
        checked.append(algo)
        if algo == ConvAlgo.MaskImplicitGemm:
            return 1.0 if k == 2 else float("nan")
        return 1e-6

    monkeypatch.setattr(backend, "_check_algo", fake_check)
    cuda = torch.device("cuda")
    with pytest.warns(RuntimeWarning, match="MaskImplicitGemm: relative error 1 .*using Native"):
        assert backend._resolve_algo(cuda, torch.float16, 2, 2, False, 8, 16) == ConvAlgo.Native
    assert checked == [ConvAlgo.MaskImplicitGemm, ConvAlgo.Native]
    assert backend._resolve_algo(cuda, torch.float16, 2, 2, False, 8, 16) == ConvAlgo.Native
    assert len(checked) == 2  # verified once per (device, config)

    def crashing(algo, *args):
        raise RuntimeError("catastrophic error")

    monkeypatch.setattr(backend, "_check_algo", crashing)
    with pytest.raises(RuntimeError, match="spconv gives wrong results or fails .*MaskImplicitGemm: RuntimeError: "
                                           "catastrophic error; Native: RuntimeError"):
        backend._resolve_algo(cuda, torch.float32, 7, 1, True, 96, 96)
    # a passing preferred algorithm is used as is, and the CPU never runs the check
    monkeypatch.setattr(backend, "_check_algo", lambda *a: 0.0)
    assert backend._resolve_algo(cuda, torch.float32, 3, 1, True, 4, 4) == ConvAlgo.MaskImplicitGemm
    assert backend._algo_for(torch.randn(2, 4), torch.randn(4, 4, 3, 3), 3, 1, True) == ConvAlgo.Native


def test_registry_and_options_from_environment(monkeypatch):
    assert isinstance(get_backend("spconv"), SpconvBackend)
    monkeypatch.setenv("MIMSPARSE_SPCONV_DWCONV", "rulebook")
    monkeypatch.setenv("MIMSPARSE_SPCONV_ALGO", "mask_split_implicit_gemm")
    b = get_backend("spconv")
    assert b.dwconv_impl == "rulebook" and b.algo == ConvAlgo.MaskSplitImplicitGemm
