"""The backend conformance suite: every registered backend against the masked-dense reference and
plain torch (CPU): each op forward and backward, all-masked samples, refusals, then whole models (the
encoder's stages, outputs, FCMAE loss and gradients). A backend whose library is missing is skipped
through its marker (tests/helpers.backend_param). What only one backend has is in
test_packed_backend.py, test_spconv_backend.py and test_minkowski_backend.py."""
import copy

import pytest
import torch
import torch.nn.functional as F

from mimsparse.backends import backend_names, get_backend
from mimsparse.models.convnextv2 import GRN, SparseConvNeXtV2
from mimsparse.models.fcmae import FCMAE
from mimsparse.sparse import SparseBatch
from tests.helpers import backend_or_skip, backend_param, downsample, random_active, randomize_, rel_err

TOL = 1e-4
dense = get_backend("dense")
ALL = [backend_param(name) for name in backend_names()]
SPARSE = [backend_param(name) for name in backend_names() if name != "dense"]
ALT_DWCONV = {"spconv": "rulebook", "minkowski": "kernel_map"}  # the non-default depthwise implementation
ALL_DW = [backend_param(lib, dw, id=f"{lib}-{dw or 'default'}-dw") for lib in backend_names()
          for dw in ((None, ALT_DWCONV[lib]) if lib in ALT_DWCONV else (None,))]


def _backend(lib, dwconv=None):
    """The registry's backend (skips when the library is missing), or one with the given depthwise impl."""
    backend = backend_or_skip(lib)
    return backend if dwconv is None else type(backend)(dwconv=dwconv)


def _every_dwconv(lib):
    return [_backend(lib)] + ([_backend(lib, ALT_DWCONV[lib])] if lib in ALT_DWCONV else [])


def _check_native(lib, t, stride):
    """``t`` is the library's own tensor, at ``stride`` image pixels per site (an input at stride 1)."""
    if lib == "dense":
        from mimsparse.backends.dense import MaskedDense

        assert isinstance(t, MaskedDense)
    elif lib == "packed":
        from mimsparse.backends.packed import PackedTensor

        assert isinstance(t, PackedTensor)
    elif lib == "spconv":
        from mimsparse.backends.spconv import SpconvTensor

        assert isinstance(t, SpconvTensor)
    else:
        import MinkowskiEngine as ME

        from mimsparse.backends.minkowski import MinkowskiTensor

        assert isinstance(t, MinkowskiTensor) and isinstance(t.st, ME.SparseTensor)
        # ME's strided map: coordinates in input units, multiples of the tensor stride
        assert t.tensor_stride == stride and list(t.st.tensor_stride) == [stride, stride]
        assert (t.st.C[:, 1:] % stride == 0).all()
    assert t.stride == stride


def _masked(x, active):
    return x * active.unsqueeze(1)


def _run_both(op, backend, x, active, weight, bias):
    """``op`` with ``backend`` and with the dense backend on copies of the same leaves, then the
    same random output gradient through both: (tensor, out, ref, [(grad, ref grad) for x, weight, bias])."""
    leaves = [x.clone().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_()]
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    def call(be, *args):  # an op's name, or a function of (backend, tensor, weight, bias)
        return getattr(be, op)(*args) if isinstance(op, str) else op(be, *args)

    t = call(backend, backend.from_dense(leaves[0], active), leaves[1], leaves[2])
    t_ref = call(dense, dense.from_dense(ref_leaves[0], active), ref_leaves[1], ref_leaves[2])
    out, ref = backend.to_dense(t), dense.to_dense(t_ref)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7))
    (out * g).sum().backward()
    (ref * g).sum().backward()
    return t, out, ref, [(a.grad, r.grad) for a, r in zip(leaves, ref_leaves)]


# ---- each op against the dense backend and F.conv2d --------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("lib", ALL)
def test_conv_equals_dense_and_conv2d(lib, k):
    backend = _backend(lib)
    x = torch.randn(3, 6, 9, 13)
    active = random_active(3, 9, 13, 0.4, seed=k, empty_sample=1)
    w, b = torch.randn(5, 6, k, k), torch.randn(5)
    t, out, ref, grads = _run_both("conv", backend, x, active, w, b)
    _check_native(lib, t, 1)
    assert rel_err(out, ref) < TOL
    assert rel_err(out, _masked(F.conv2d(_masked(x, active), w, b, padding=k // 2), active)) < TOL
    assert torch.equal(backend.to_sparse(t).active_mask(), active)
    for grad, ref_grad in grads:
        assert rel_err(grad, ref_grad) < TOL


@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("lib,dw", ALL_DW)
def test_dwconv_equals_dense_and_grouped_conv2d(lib, dw, k):
    x = torch.randn(3, 8, 10, 7)
    active = random_active(3, 10, 7, 0.5, seed=10 + k, empty_sample=2)
    w, b = torch.randn(8, 1, k, k), torch.randn(8)
    _, out, ref, grads = _run_both("dwconv", _backend(lib, dw), x, active, w, b)
    assert rel_err(out, ref) < TOL
    assert rel_err(out, _masked(F.conv2d(_masked(x, active), w, b, padding=k // 2, groups=8), active)) < TOL
    for grad, ref_grad in grads:
        assert rel_err(grad, ref_grad) < TOL


@pytest.mark.parametrize("k,shape", [(2, (8, 12)), (2, (9, 13)), (3, (9, 12)), (4, (9, 10))])
@pytest.mark.parametrize("lib", ALL)
def test_downsample_equals_dense(lib, k, shape):
    backend = _backend(lib)
    h, w = shape
    x = torch.randn(3, 4, h, w)
    active = random_active(3, h, w, 0.3, seed=5, empty_sample=0)
    weight, b = torch.randn(7, 4, k, k), torch.randn(7)
    t, out, ref, grads = _run_both(downsample, backend, x, active, weight, b)
    ref_t = downsample(dense, dense.from_dense(x, active), weight, b)
    _check_native(lib, t, k)
    sb = backend.to_sparse(t)
    assert sb.stride == k and sb.spatial_shape == (h // k, w // k)
    assert torch.equal(sb.active_mask(), ref_t.active_bhw)
    assert torch.equal(ref_t.active_bhw, F.max_pool2d(active[:, None].float(), k)[:, 0] > 0)
    # rows in (batch, raster) order, and each row's coordinates carry its own features
    b_, y_, x_ = sb.coords.long().unbind(1)
    flat = (b_ * (h // k) + y_) * (w // k) + x_
    assert torch.equal(flat, flat.sort().values)
    assert rel_err(sb.feats, ref.permute(0, 2, 3, 1)[b_, y_, x_]) < TOL
    assert rel_err(out, ref) < TOL
    assert rel_err(out, _masked(F.conv2d(_masked(x, active), weight, b, stride=k), ref_t.active_bhw)) < TOL
    for grad, ref_grad in grads:
        assert rel_err(grad, ref_grad) < TOL


@pytest.mark.parametrize("k,stride,padding", [(3, 2, 1), (3, 2, 0), (2, 1, 0), (1, 2, 0)])
@pytest.mark.parametrize("lib", ALL)
def test_strided_conv_at_the_sites_it_reaches_equals_conv2d(lib, k, stride, padding):
    """Without output sites given, a strided conv produces every output site whose window holds an
    active input (the libraries' generative strided conv), also for overlapping windows."""
    backend = _backend(lib)
    x = torch.randn(3, 4, 9, 12)
    active = random_active(3, 9, 12, 0.3, seed=k + stride, empty_sample=1)
    weight, b = torch.randn(6, 4, k, k), torch.randn(6)

    def op(be, t, w, bias):
        return be.strided_conv(t, w, bias, stride, padding=padding)

    t, out, ref, grads = _run_both(op, backend, x, active, weight, b)
    reached = F.max_pool2d(active[:, None].float(), k, stride, padding)[:, 0] > 0
    sb = backend.to_sparse(t)
    assert sb.stride == stride and torch.equal(sb.active_mask(), reached)
    assert rel_err(out, _masked(F.conv2d(_masked(x, active), weight, b, stride=stride, padding=padding), reached)) < TOL
    assert rel_err(out, ref) < TOL
    for grad, ref_grad in grads:
        assert rel_err(grad, ref_grad) < TOL


@pytest.mark.parametrize("k,stride,padding", [(7, 2, 3), (3, 2, 1), (1, 2, 0), (3, 1, 1)])
@pytest.mark.parametrize("lib", ALL)
def test_strided_conv_at_given_sites_equals_conv2d(lib, k, stride, padding):
    """A ResNet's strided convs (7x7 stem, 3x3 and 1x1 stride 2) evaluated at the output sites the
    caller gives, any pattern (some with no active input in their window, some active inputs read by
    no output), forward and all three gradients."""
    backend = _backend(lib)
    x = torch.randn(3, 4, 11, 14)
    active = random_active(3, 11, 14, 0.4, seed=k, empty_sample=1)
    out_shape = ((11 + 2 * padding - k) // stride + 1, (14 + 2 * padding - k) // stride + 1)
    active_out = random_active(3, *out_shape, 0.5, seed=k + 20, empty_sample=2)
    weight, b = torch.randn(6, 4, k, k), torch.randn(6)

    def op(be, t, w, bias):
        return be.strided_conv(t, w, bias, stride, padding=padding, active_out_bhw=active_out)

    t, out, ref, grads = _run_both(op, backend, x, active, weight, b)
    _check_native(lib, t, stride)
    assert torch.equal(backend.to_sparse(t).active_mask(), active_out)
    expect = _masked(F.conv2d(_masked(x, active), weight, b, stride=stride, padding=padding), active_out)
    assert rel_err(out, expect) < TOL and rel_err(out, ref) < TOL
    for grad, ref_grad in grads:
        assert rel_err(grad, ref_grad) < TOL


@pytest.mark.parametrize("lib", ALL)
def test_max_pool_at_given_sites_equals_dense(lib):
    """3x3 stride-2 max over the active inputs of each window, at the given output sites (0 where a
    window holds no active input), and its gradient to the winning rows."""
    backend = _backend(lib)
    x = torch.randn(3, 5, 12, 9)
    active = random_active(3, 12, 9, 0.4, seed=3, empty_sample=0)
    active_out = random_active(3, 6, 5, 0.6, seed=4)
    leaves = [x.clone().requires_grad_() for _ in range(2)]
    outs = [be.to_dense(be.max_pool(be.from_dense(leaf, active), 3, 2, active_out))
            for be, leaf in ((backend, leaves[0]), (dense, leaves[1]))]
    masked = x.masked_fill(~active.unsqueeze(1), float("-inf"))
    expect = _masked(F.max_pool2d(masked, 3, 2, padding=1).nan_to_num(0.0, neginf=0.0), active_out)
    assert rel_err(outs[0], expect) < TOL and rel_err(outs[0], outs[1]) < TOL
    g = torch.randn(outs[1].shape, generator=torch.Generator().manual_seed(5))
    for out in outs:
        (out * g).sum().backward()
    assert rel_err(leaves[0].grad, leaves[1].grad) < TOL


@pytest.mark.parametrize("impl", ["gather", "dense"])
@pytest.mark.parametrize("k", [3, 5])
def test_packed_conv_implementations_equal_conv2d(impl, k):
    """Both of packed's k x k conv implementations (gather-GEMM, dense map), whichever density picks."""
    from mimsparse.backends.packed import PackedBackend

    x = torch.randn(2, 6, 10, 13)
    active = random_active(2, 10, 13, 0.7, seed=k, empty_sample=1)
    w, b = torch.randn(5, 6, k, k), torch.randn(5)
    _, out, ref, grads = _run_both("conv", PackedBackend(conv_impl=impl), x, active, w, b)
    assert rel_err(out, _masked(F.conv2d(_masked(x, active), w, b, padding=k // 2), active)) < TOL
    assert rel_err(out, ref) < TOL
    for grad, ref_grad in grads:
        assert rel_err(grad, ref_grad) < TOL


@pytest.mark.parametrize("lib", ALL)
def test_downsample_of_sites_only_in_a_partial_block_is_empty(lib, capfd):
    backend = _backend(lib)
    sb = SparseBatch(torch.tensor([[0, 2, 1], [1, 0, 2]], dtype=torch.int32), torch.randn(2, 4), 2, (3, 3))
    weight = torch.randn(5, 4, 2, 2, requires_grad=True)
    t = downsample(backend, backend.from_sparse(sb), weight, torch.randn(5))
    assert backend.to_sparse(t).feats.shape == (0, 5) and backend.to_sparse(t).spatial_shape == (1, 1)
    _check_native(lib, t, 2)
    backend.to_dense(t).sum().backward()
    assert "MinkowskiPruning" not in capfd.readouterr().err  # ME's pruning complains when it empties a map


@pytest.mark.parametrize("lib", ALL)
def test_per_sample_ops_against_plain_torch(lib):
    """sample_l2_norm (float32) and scale_samples ([B] and [B, C] scales, a shift only at active sites),
    forward and backward, against torch on the masked map; a sample without sites included."""
    backend = _backend(lib)
    torch.manual_seed(0)
    x = torch.randn(3, 16, 6, 5)
    active = random_active(3, 6, 5, 0.5, seed=2, empty_sample=1)
    g = torch.randn(3, 16, 6, 5)
    for scale, shift in ((torch.randn(3), None), (torch.randn(3, 16), torch.randn(16))):
        leaves = [x.clone().requires_grad_(), scale.clone().requires_grad_()]
        ref_leaves = [v.detach().clone().requires_grad_() for v in leaves]
        t = backend.from_dense(leaves[0], active)
        norm = backend.sample_l2_norm(t)
        out = backend.to_dense(backend.scale_samples(t, leaves[1], shift))
        xm = _masked(ref_leaves[0], active)
        ref_norm = torch.linalg.vector_norm(xm, dim=(2, 3))
        per_sample = ref_leaves[1].view(3, -1, 1, 1)
        ref = _masked(xm * per_sample + (0 if shift is None else shift.view(1, -1, 1, 1)), active)
        assert norm.dtype == torch.float32 and rel_err(norm, ref_norm) < TOL
        assert rel_err(out, ref) < TOL
        ((out * g).sum() + norm.sum()).backward()
        ((ref * g).sum() + ref_norm.sum()).backward()
        for leaf, ref_leaf in zip(leaves, ref_leaves):
            assert torch.isfinite(leaf.grad).all() and rel_err(leaf.grad, ref_leaf.grad) < TOL


@pytest.mark.parametrize("lib", ALL)
def test_grn_is_per_sample_and_equals_timm(lib):
    """The model's GRN over each backend equals timm's GlobalResponseNorm run on each sample alone
    (forward and the input gradient), so no statistic crosses samples."""
    from timm.layers.grn import GlobalResponseNorm

    backend = _backend(lib)
    torch.manual_seed(0)
    x = torch.randn(3, 16, 6, 5)
    active = random_active(3, 6, 5, 0.5, seed=2, empty_sample=1)
    grn, ref_grn = GRN(16), GlobalResponseNorm(16, channels_last=False)
    with torch.no_grad():
        grn.weight.normal_(), grn.bias.normal_()
        ref_grn.weight.copy_(grn.weight), ref_grn.bias.copy_(grn.bias)
    x_in, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = backend.to_dense(grn(backend.from_dense(x_in, active), backend))
    ref = torch.cat([_masked(ref_grn(_masked(x_ref[i:i + 1], active[i:i + 1])), active[i:i + 1]) for i in range(3)])
    assert rel_err(out, ref) < TOL
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7))
    (out * g).sum().backward()
    (ref * g).sum().backward()
    assert rel_err(x_in.grad, x_ref.grad) < TOL
    assert rel_err(grn.weight.grad, ref_grn.weight.grad) < TOL and rel_err(grn.bias.grad, ref_grn.bias.grad) < TOL


# ---- entering and leaving, empty batches ---------------------------------------------------------------
@pytest.mark.parametrize("lib", ALL)
def test_non_contiguous_coords_are_read_correctly(lib):
    # Tensor.nonzero() returns column-major indices, which spconv would silently misread and ME refuses
    backend = _backend(lib)
    x = torch.randn(2, 3, 7, 9)
    active = random_active(2, 7, 9, 0.5, seed=3)
    sb = SparseBatch.from_dense(x, active)
    coords_t = sb.coords.t().contiguous().t()
    assert not coords_t.is_contiguous()
    sb_t = SparseBatch(coords_t, sb.feats, 2, (7, 9))
    sb_raw = SparseBatch(coords_t, sb.feats, 2, (7, 9))
    sb_raw.coords = coords_t  # SparseBatch makes them contiguous itself: bypass that
    w = torch.randn(4, 3, 3, 3)
    ref = _masked(F.conv2d(_masked(x, active), w, padding=1), active)
    for sb_in in (sb_t, sb_raw):
        assert rel_err(backend.to_dense(backend.conv(backend.from_sparse(sb_in), w, None)), ref) < TOL


@pytest.mark.parametrize("lib", ALL)
def test_all_masked_batch_has_no_rows_and_backpropagates(lib):
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    active = torch.zeros(2, 6, 6, dtype=torch.bool)
    w_dw, w_c, w_d = (torch.randn(*s, requires_grad=True) for s in ((4, 1, 7, 7), (4, 4, 3, 3), (8, 4, 2, 2)))
    for backend in _every_dwconv(lib):
        t = backend.from_dense(x, active)
        assert backend.to_sparse(t).feats.shape == (0, 4)
        y = backend.conv(backend.dwconv(t, w_dw, None), w_c, torch.zeros(4))
        y = GRN(4)(backend.map_feats(y, torch.nn.functional.gelu), backend)
        y = downsample(backend, y, w_d, torch.zeros(8))
        assert backend.to_sparse(y).feats.shape == (0, 8) and backend.to_sparse(y).spatial_shape == (3, 3)
        _check_native(lib, y, 2)
        assert backend.to_sparse(y).coords.shape == (0, 3)
        assert backend.to_dense(y).shape == (2, 8, 3, 3) and backend.to_dense(y).abs().sum() == 0
        backend.to_dense(y).sum().backward()
    assert x.grad.abs().sum() == 0 and w_d.grad.abs().sum() == 0


# ---- refusals -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("lib", ALL)
def test_bad_coordinates_are_refused(lib):
    backend = _backend(lib)
    feats = torch.randn(2, 3)
    for coords, match in (([[0, 0, 0], [0, 5, 1]], "outside the spatial shape"),
                          ([[0, 0, 0], [0, 1, -1]], "outside the spatial shape"),
                          ([[0, 0, 0], [2, 1, 1]], "batch index out of range"),
                          ([[0, 1, 2], [0, 1, 2]], "duplicate")):  # ME would silently merge these
        sb = SparseBatch(torch.tensor(coords, dtype=torch.int32), feats, 2, (5, 4))
        with pytest.raises(ValueError, match=match):
            backend.from_sparse(sb)


@pytest.mark.parametrize("lib", ALL)
def test_bad_weights_and_options_are_refused(lib):
    backend = _backend(lib)
    t = backend.from_dense(torch.randn(1, 4, 5, 5), random_active(1, 5, 5, 0.5, seed=0))
    with pytest.raises(ValueError, match="input channels"):
        backend.conv(t, torch.randn(3, 5, 3, 3), None)
    with pytest.raises(ValueError, match="odd kernel"):
        backend.dwconv(t, torch.randn(4, 1, 4, 4), None)
    with pytest.raises(ValueError, match="square kernel"):
        downsample(backend, t, torch.randn(4, 4, 2, 3), None)
    with pytest.raises(ValueError, match="5x5 map is smaller than the 8x8 window"):
        downsample(backend, t, torch.randn(4, 4, 8, 8), None)
    with pytest.raises(ValueError, match="0 <= padding < k"):
        backend.strided_conv(t, torch.randn(4, 4, 3, 3), None, 2, padding=3)
    if lib in ALT_DWCONV:
        with pytest.raises(ValueError, match="unknown depthwise"):
            type(backend)(dwconv="grouped")


# ---- whole models ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("lib", [backend_param(lib) for lib in ALT_DWCONV])
def test_encoder_stages_equal_dense_with_the_other_dwconv(lib):
    backend = _backend(lib, ALT_DWCONV[lib])
    enc = randomize_(SparseConvNeXtV2.from_name("convnextv2_atto", backend="dense"), seed=5, std=0.1)
    enc_lib = copy.deepcopy(enc)
    enc_lib.backend = backend
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    visible = torch.tensor([[[True, False], [False, True]],
                            [[True, False], [False, False]],  # a single site at every stage
                            [[False, False], [False, False]]])  # one sample with every patch masked
    with torch.no_grad():
        ref = enc.forward_sparse(x, visible, return_stages=True)
        out = enc_lib.forward_sparse(x, visible, return_stages=True)
    for i, (a, r) in enumerate(zip(out, ref)):
        assert a.stride == r.stride == 4 * 2 ** i
        if lib == "minkowski":
            assert a.tensor_stride == 2 ** i  # ME's grid is the stem output's
        assert rel_err(backend.to_dense(a), r.x_bchw) < TOL, f"stage {i}"


@pytest.fixture(params=SPARSE)
def backend(request):
    return backend_or_skip(request.param)


def _encoder_pair(backend, seed=0, **kwargs):
    enc = randomize_(SparseConvNeXtV2.from_name("convnextv2_atto", backend="dense", **kwargs), seed=seed, std=0.1)
    other = copy.deepcopy(enc)
    other.backend = backend
    return enc, other


def _visible(b, h, w, seed):
    visible = random_active(b, h, w, 0.5, seed=seed)
    visible[0, 0, 0] = True
    visible[-1] = False  # one sample with every patch masked
    return visible


def _grads(module):
    return {n: p.grad for n, p in module.named_parameters()}


def test_encoder_forward_and_grads_equal_dense_non_square(backend):
    enc, other = _encoder_pair(backend, seed=3)
    assert all(p.any() for n, p in enc.named_parameters() if "grn" in n)  # randomised, not zero-init
    x = torch.randn(3, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    visible = _visible(3, 2, 3, seed=4)
    outs = []
    for model in (enc, other):
        out = model(x, visible)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out)
    assert outs[0].shape == (3, 320, 2, 3)
    assert rel_err(outs[1], outs[0]) < TOL
    ref_grads, grads = _grads(enc), _grads(other)
    for name, ref_grad in ref_grads.items():
        assert rel_err(grads[name], ref_grad) < TOL, name


def test_fcmae_loss_and_grads_equal_dense(backend):
    enc, _ = _encoder_pair(backend, seed=7)
    model = FCMAE(enc, decoder_dim=32, mask_ratio=0.6)
    randomize_(model.decoder, seed=8, std=0.1)
    other = copy.deepcopy(model)
    other.encoder.backend = backend
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    visible = model.make_mask(x, torch.Generator().manual_seed(0))
    losses = []
    for m in (model, other):
        loss, _, _ = m(x, visible)
        loss.backward()
        losses.append(loss)
    assert abs(losses[1].item() - losses[0].item()) <= TOL * abs(losses[0].item())
    ref_grads, grads = _grads(model), _grads(other)
    for name, ref_grad in ref_grads.items():
        assert rel_err(grads[name], ref_grad) < TOL, name


def test_eval_mode_no_grad_works_and_matches_dense(backend):
    enc, other = _encoder_pair(backend, seed=9, drop_path_rate=0.2)
    enc.eval(), other.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    visible = _visible(2, 2, 2, seed=1)
    with torch.no_grad():  # spconv's CPU kernels crash on a bias in inference: its backend adds it
        assert rel_err(other(x, visible), enc(x, visible)) < TOL
    with torch.inference_mode():
        assert rel_err(other(x, visible), enc(x, visible)) < TOL
