"""The MinkowskiEngine backend on a CUDA GPU against the dense backend on the same GPU: every op (forward
and backward) and a whole FCMAE training step. Needs a GPU and a CUDA build of MinkowskiEngine
(`make minkowski-cuda`); skipped on CPU machines. Run by the GPU check: `pytest -m cuda`."""
import copy

import pytest
import torch
import torch.nn.functional as F

from mimsparse.backends import get_backend
from mimsparse.models.convnextv2 import GRN, SparseConvNeXtV2
from mimsparse.models.fcmae import FCMAE
from tests.helpers import backend_or_skip, downsample, random_active, randomize_, rel_err

pytestmark = [pytest.mark.cuda, pytest.mark.minkowski,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TOL = 1e-4
CUDA = torch.device("cuda")
dense = get_backend("dense")


@pytest.fixture(autouse=True)
def _seeded_full_fp32():
    torch.manual_seed(0)
    # cuDNN convolutions default to TF32 (10-bit mantissa): the dense reference must be full fp32.
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


@pytest.fixture(params=["dense", "kernel_map"], ids=lambda dw: f"{dw}-dw")
def mink(request):
    """The minkowski backend with each depthwise implementation; fails (not skips) on a GPU machine
    whose MinkowskiEngine was built for CPU only, since that is what this check exists to catch."""
    backend = backend_or_skip("minkowski")
    import MinkowskiEngine as ME

    if not ME.is_cuda_available():
        pytest.fail("MinkowskiEngine is a CPU-only build; build the CUDA one with `make minkowski-cuda`")
    return type(backend)(dwconv=request.param)


def _on_gpu(*tensors):
    return [t.to(CUDA) for t in tensors]


def _run_both(backend, op, x, active, *params, **kwargs):
    """``op`` with ``backend`` and with the dense backend on CUDA copies of the same leaves, then one random
    output gradient through both: (native output, out, ref, [(grad, ref grad) per leaf])."""
    leaves = [t.to(CUDA, copy=True).requires_grad_() for t in (x, *params)]
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    active = active.to(CUDA)
    t = getattr(backend, op)(backend.from_dense(leaves[0], active), *leaves[1:], **kwargs)
    t_ref = getattr(dense, op)(dense.from_dense(ref_leaves[0], active), *ref_leaves[1:], **kwargs)
    out, ref = backend.to_dense(t), dense.to_dense(t_ref)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7)).to(CUDA)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    return t, out, ref, [(a.grad, r.grad) for a, r in zip(leaves, ref_leaves)]


def _check(out, ref, grads):
    assert out.device.type == CUDA.type and out.shape == ref.shape
    assert rel_err(out, ref) < TOL
    for grad, ref_grad in grads:
        assert grad.device.type == CUDA.type and rel_err(grad, ref_grad) < TOL


def _check_native(t, stride=1):
    """``t`` lives on the GPU, in ME's GPU coordinate manager, at ``stride`` pixels per site."""
    assert t.feats.is_cuda and "GPU" in type(t.manager._manager).__name__  # CoordinateMapManagerGPU_*
    assert t.stride == stride


# ---- entering and leaving ----------------------------------------------------------------------------
def test_round_trip_on_gpu(mink):
    x = torch.randn(3, 5, 9, 11)
    active = random_active(3, 9, 11, 0.4, seed=0, empty_sample=1)
    x[0, :, active[0].nonzero()[0, 0], active[0].nonzero()[0, 1]] = 0.0  # an all-zero site stays a site
    x, active = _on_gpu(x, active)
    t = mink.from_dense(x, active)
    _check_native(t)
    sb, ref = mink.to_sparse(t), dense.to_sparse(dense.from_dense(x, active))
    assert sb.coords.device.type == CUDA.type and torch.equal(sb.coords, ref.coords) and torch.equal(sb.feats, ref.feats)
    assert torch.equal(mink.to_dense(t), x * active.unsqueeze(1))


def test_all_masked_batch_on_gpu(mink):
    x = torch.randn(2, 4, 6, 6, device=CUDA, requires_grad=True)
    active = torch.zeros(2, 6, 6, dtype=torch.bool, device=CUDA)
    w_dw, w_c, w_d = (torch.randn(*s, device=CUDA, requires_grad=True) for s in ((4, 1, 7, 7), (4, 4, 3, 3), (8, 4, 2, 2)))
    t = mink.from_dense(x, active)
    y = downsample(mink, mink.conv(mink.dwconv(t, w_dw, None), w_c, torch.zeros(4, device=CUDA)), w_d, None)
    assert mink.feats(y).shape == (0, 8) and y.spatial_shape == (3, 3)
    out = mink.to_dense(y)
    assert out.shape == (2, 8, 3, 3) and out.abs().sum() == 0
    out.sum().backward()
    for leaf in (x, w_dw, w_c, w_d):  # no site: no gradient (None when the graph never reached it)
        assert leaf.grad is None or leaf.grad.abs().sum() == 0


# ---- convolutions --------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 7])
def test_conv(mink, k):
    x, w, b = torch.randn(3, 6, 9, 13), torch.randn(5, 6, k, k), torch.randn(5)
    active = random_active(3, 9, 13, 0.4, seed=k, empty_sample=1)
    t, out, ref, grads = _run_both(mink, "conv", x, active, w, b)
    _check_native(t)
    _check(out, ref, grads)
    # and plain cuDNN on the masked input
    expected = F.conv2d(x.to(CUDA) * active.to(CUDA).unsqueeze(1), w.to(CUDA), b.to(CUDA), padding=k // 2)
    assert rel_err(out, expected * active.to(CUDA).unsqueeze(1)) < TOL


@pytest.mark.parametrize("k", [3, 7])
def test_dwconv(mink, k):
    x, w, b = torch.randn(3, 8, 10, 7), torch.randn(8, 1, k, k), torch.randn(8)
    active = random_active(3, 10, 7, 0.5, seed=10 + k, empty_sample=2)
    t, out, ref, grads = _run_both(mink, "dwconv", x, active, w, b)
    _check_native(t)
    _check(out, ref, grads)


@pytest.mark.parametrize("k,shape", [(2, (8, 12)), (2, (9, 13)), (4, (9, 10))])
def test_downsample(mink, k, shape):
    h, w = shape
    x, weight, b = torch.randn(3, 4, h, w), torch.randn(7, 4, k, k), torch.randn(7)
    active = random_active(3, h, w, 0.3, seed=5, empty_sample=0)
    t, out, ref, grads = _run_both(mink, "strided_conv", x, active, weight, b, stride=k, padding=0)
    _check_native(t, k)
    _check(out, ref, grads)
    assert torch.equal(mink.to_sparse(t).active_mask(), out.abs().sum(1) > 0)


def test_convs_after_downsample_use_the_coarse_grid(mink):
    x, active = _on_gpu(torch.randn(2, 4, 12, 10), random_active(2, 12, 10, 0.35, seed=11))
    wd, wc, wdw = _on_gpu(torch.randn(6, 4, 2, 2), torch.randn(5, 6, 3, 3), torch.randn(6, 1, 5, 5))
    t = downsample(mink, mink.from_dense(x, active), wd, None)
    r = downsample(dense, dense.from_dense(x, active), wd, None)
    assert rel_err(mink.to_dense(mink.dwconv(t, wdw, None)), dense.to_dense(dense.dwconv(r, wdw, None))) < TOL
    assert rel_err(mink.to_dense(mink.conv(t, wc, None)), dense.to_dense(dense.conv(r, wc, None))) < TOL


@pytest.mark.parametrize("k,stride,hw", [(3, 2, (9, 12)), (1, 2, (8, 7)), (7, 2, (11, 8))])
def test_strided_conv(mink, k, stride, hw):
    h, w = hw
    x, weight, b = torch.randn(3, 5, h, w), torch.randn(4, 5, k, k), torch.randn(4)
    active = random_active(3, h, w, 0.5, seed=k, empty_sample=1)
    active_out = random_active(3, -(-h // stride), -(-w // stride), 0.7, seed=k + 1).to(CUDA)
    t, out, ref, grads = _run_both(mink, "strided_conv", x, active, weight, b, stride=stride, padding=k // 2,
                                   active_out_bhw=active_out)
    _check_native(t, stride)
    _check(out, ref, grads)
    assert torch.equal(mink.to_sparse(t).active_mask(), active_out)


@pytest.mark.parametrize("k,stride,hw", [(3, 2, (9, 12)), (5, 3, (10, 7))])
def test_max_pool(mink, k, stride, hw):
    h, w = hw
    x = torch.randn(3, 5, h, w)
    active = random_active(3, h, w, 0.5, seed=k + 10, empty_sample=1)
    active_out = random_active(3, -(-h // stride), -(-w // stride), 0.7, seed=k + 11).to(CUDA)
    t, out, ref, grads = _run_both(mink, "max_pool", x, active, kernel=k, stride=stride, active_out_bhw=active_out)
    _check_native(t, stride)
    _check(out, ref, grads)


def test_patch_embed(mink):
    image, active = _on_gpu(torch.randn(2, 3, 32, 32), random_active(2, 8, 8, 0.4, seed=3))
    weight, bias = _on_gpu(torch.randn(6, 3, 4, 4), torch.randn(6))
    t = mink.patch_embed(image, active, weight, bias, 4)
    _check_native(t, 4)
    assert rel_err(mink.to_dense(t), dense.to_dense(dense.patch_embed(image, active, weight, bias, 4))) < TOL


# ---- per-site and per-sample ops -------------------------------------------------------------------------
def test_per_sample_ops_grn_map_feats_add(mink):
    x = torch.randn(3, 16, 6, 5)
    active = random_active(3, 6, 5, 0.5, seed=2, empty_sample=1)
    shift, scale, scale_bc = torch.randn(16), torch.tensor([0.5, 0.0, 2.0]), torch.randn(3, 16)
    for op, params, kwargs in (("scale_samples", (scale,), {}), ("scale_samples", (scale_bc, shift), {}),
                               ("map_feats", (), {"fn": F.gelu})):
        t, out, ref, grads = _run_both(mink, op, x, active, *params, **kwargs)
        _check_native(t)
        _check(out, ref, grads)
    # the model's GRN (sample_l2_norm + scale_samples) on CUDA, against the dense backend on CUDA
    grn = GRN(16).to(CUDA)
    with torch.no_grad():
        grn.weight.normal_(), grn.bias.normal_()
    xs, act = _on_gpu(x, active)
    norm = mink.sample_l2_norm(mink.from_dense(xs, act))
    assert norm.device.type == CUDA.type and rel_err(norm, dense.sample_l2_norm(dense.from_dense(xs, act))) < TOL
    out = mink.to_dense(grn(mink.from_dense(xs, act), mink))
    assert rel_err(out, dense.to_dense(grn(dense.from_dense(xs, act), dense))) < TOL
    xs, active = _on_gpu(x, active)
    a, b = mink.from_dense(xs, active), mink.from_dense(xs * 2, active)
    assert rel_err(mink.to_dense(mink.add(a, b)), 3 * xs * active.unsqueeze(1)) < TOL


def test_map_rows_batch_norm_and_sample_index(mink):
    # SparK's sparse BatchNorm as the ResNet encoder runs it (bn over the active rows), and a per-sample scale
    x = torch.randn(3, 6, 7, 8) * 3 + 1
    active = random_active(3, 7, 8, 0.5, seed=4, empty_sample=2)
    bn, bn_ref = torch.nn.BatchNorm2d(6).to(CUDA), torch.nn.BatchNorm2d(6).to(CUDA)
    leaf, ref_leaf = (x.to(CUDA, copy=True).requires_grad_() for _ in range(2))
    act = active.to(CUDA)

    def rows_fn(module):
        return lambda feats_nc, batch_n: module(feats_nc[:, :, None, None]).flatten(1) * (batch_n[:, None] + 1)

    out = mink.to_dense(mink.map_rows(mink.from_dense(leaf, act), rows_fn(bn)))
    ref = dense.to_dense(dense.map_rows(dense.from_dense(ref_leaf, act), rows_fn(bn_ref)))
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(CUDA)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    _check(out, ref, [(leaf.grad, ref_leaf.grad), (bn.weight.grad, bn_ref.weight.grad)])
    assert rel_err(bn.running_mean, bn_ref.running_mean) < TOL and rel_err(bn.running_var, bn_ref.running_var) < TOL


def test_float64_conv_is_exact(mink):
    x, w = torch.randn(2, 4, 9, 9, dtype=torch.float64), torch.randn(3, 4, 3, 3, dtype=torch.float64)
    active = random_active(2, 9, 9, 0.5, seed=1)
    _, out, ref, grads = _run_both(mink, "conv", x, active, w, torch.zeros(3, dtype=torch.float64))
    assert out.dtype == torch.float64 and rel_err(out, ref) < 1e-12
    for grad, ref_grad in grads:
        assert rel_err(grad, ref_grad) < 1e-12


# ---- a whole FCMAE training step -------------------------------------------------------------------------
def test_fcmae_training_step_equals_dense(mink):
    enc = randomize_(SparseConvNeXtV2.from_name("convnextv2_atto", backend="dense"), seed=7, std=0.1)
    model = FCMAE(enc, decoder_dim=32, mask_ratio=0.6)
    randomize_(model.decoder, seed=8, std=0.1)
    model = model.to(CUDA)
    other = copy.deepcopy(model)
    other.encoder.backend = mink
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(3)).to(CUDA)
    visible = model.make_mask(x, torch.Generator().manual_seed(0))
    visible[-1] = False  # one sample with every patch masked
    losses = []
    for m in (model, other):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)  # linear in the gradient (Adam would amplify noise)
        loss, _, _ = m(x, visible)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[1] - losses[0]) <= TOL * abs(losses[0])
    for (name, p), (_, p_ref) in zip(other.named_parameters(), model.named_parameters()):
        assert p.device.type == CUDA.type and rel_err(p.grad, p_ref.grad) < TOL, (name, rel_err(p.grad, p_ref.grad))
        assert rel_err(p, p_ref) < TOL, (name, rel_err(p, p_ref))
