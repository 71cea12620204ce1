"""The ResNet ops of every backend (masked BatchNorm, strided conv at given output sites, max pool
over active sites) against independent computations in plain torch, forward and gradients."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mimsparse.backends import Backend
from mimsparse.models.resnet import sparse_batch_norm
from tests.helpers import backend_or_skip, backend_param, random_active, rel_err

TOL = 1e-5


@pytest.fixture(params=[backend_param(name) for name in ("dense", "packed", "spconv", "minkowski")])
def backend(request):
    return backend_or_skip(request.param)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _backward(out, seed=7):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    (out * g).sum().backward()


# ---- BatchNorm over active sites ---------------------------------------------------------------------
def _reference_bn_step(rows, weight, bias, state, momentum, eps):
    """Training-mode BatchNorm written out: batch mean / biased var of the rows; running stats
    updated with the unbiased var; momentum None = cumulative average. ``state`` is updated in place."""
    mean, var = rows.mean(0), rows.var(0, unbiased=False)
    state["count"] += 1
    m = 1.0 / state["count"] if momentum is None else momentum
    n = rows.shape[0]
    state["mean"] = (1 - m) * state["mean"] + m * mean.detach()
    state["var"] = (1 - m) * state["var"] + m * var.detach() * n / (n - 1)
    return (rows - mean) / torch.sqrt(var + eps) * weight + bias


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_uses_active_sites_only(backend, momentum):
    c = 6
    bn = nn.BatchNorm2d(c, momentum=momentum)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5), bn.bias.copy_(torch.randn(c, generator=g))
        bn.running_mean.copy_(torch.randn(c, generator=g)), bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    ref_w, ref_b = _leaves(bn.weight, bn.bias)
    state = {"mean": bn.running_mean.clone(), "var": bn.running_var.clone(), "count": 0}
    for step in range(2):
        x = torch.randn(3, c, 7, 9, generator=g) * 3 + 2  # far from zero: zeros in the stats would show
        active = random_active(3, 7, 9, 0.4, seed=step, empty_sample=1)
        (x_ours,), (x_ref,) = _leaves(x), _leaves(x)
        bn.zero_grad()
        out = backend.to_dense(sparse_batch_norm(backend, backend.from_dense(x_ours, active), bn))
        rows = _reference_bn_step(x_ref.permute(0, 2, 3, 1)[active], ref_w, ref_b, state, momentum, bn.eps)
        ref = rows.new_zeros(3, 7, 9, c).index_put((active,), rows).permute(0, 3, 1, 2)
        assert rel_err(out, ref) < TOL
        assert out.permute(0, 2, 3, 1)[~active].abs().max() == 0
        _backward(out), _backward(ref)
        assert rel_err(x_ours.grad, x_ref.grad) < TOL
        assert rel_err(bn.weight.grad, ref_w.grad) < TOL and rel_err(bn.bias.grad, ref_b.grad) < TOL
        ref_w.grad = ref_b.grad = None
    assert rel_err(bn.running_mean, state["mean"]) < TOL and rel_err(bn.running_var, state["var"]) < TOL
    assert int(bn.num_batches_tracked) == 2
    # eval: the running statistics, nothing updated
    bn.eval()
    before = bn.running_mean.clone()
    out = backend.to_dense(sparse_batch_norm(backend, backend.from_dense(x, active), bn))
    rows = (x.permute(0, 2, 3, 1)[active] - state["mean"]) / torch.sqrt(state["var"] + bn.eps) * bn.weight + bn.bias
    ref = rows.new_zeros(3, 7, 9, c).index_put((active,), rows).permute(0, 3, 1, 2)
    assert rel_err(out, ref.detach()) < TOL
    assert torch.equal(bn.running_mean, before) and int(bn.num_batches_tracked) == 2


def _bn_pair(c, momentum, track, seed=0):
    bn = nn.BatchNorm2d(c, momentum=momentum, track_running_stats=track)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5), bn.bias.copy_(torch.randn(c, generator=g))
        if track:
            bn.running_mean.copy_(torch.randn(c, generator=g)), bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return bn, copy.deepcopy(bn)


@pytest.mark.parametrize("momentum, track", [(0.1, True), (None, True), (0.1, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_masked_sum_batch_norm_equals_bn_on_the_gathered_rows(momentum, track, dtype):
    """The masked-dense backend's sync-free BatchNorm (sums with the mask as a multiplier) against the
    default path, ``bn`` itself on the rows map_rows gathers: outputs, gradients and running statistics
    over three training steps (one with an all-masked batch: bn counts it and changes nothing), then eval."""
    dense, c = backend_or_skip("dense"), 5
    ours, ref = _bn_pair(c, momentum, track)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    g = torch.Generator().manual_seed(3)
    for step, p_active in enumerate((0.4, 0.0, 0.6)):
        x = (torch.randn(3, c, 6, 7, generator=g) * 3 + 2).to(dtype)
        active = random_active(3, 6, 7, p_active, seed=step, empty_sample=1)
        (x_ours,), (x_ref,) = _leaves(x), _leaves(x)
        out = dense.to_dense(dense.batch_norm(dense.from_dense(x_ours, active), ours))
        out_ref = dense.to_dense(Backend.batch_norm(dense, dense.from_dense(x_ref, active), ref))
        assert out.dtype == dtype and rel_err(out.float(), out_ref.float()) < tol
        assert out.permute(0, 2, 3, 1)[~active].abs().max() == 0
        if active.any():
            _backward(out), _backward(out_ref)
            assert rel_err(x_ours.grad.float(), x_ref.grad.float()) < tol
            assert rel_err(ours.weight.grad, ref.weight.grad) < tol and rel_err(ours.bias.grad, ref.bias.grad) < tol
        for a, b in zip(ours.buffers(), ref.buffers()):
            assert rel_err(a.float(), b.float()) < 1e-5
    ours.eval(), ref.eval()
    out = dense.to_dense(dense.batch_norm(dense.from_dense(x, active), ours))
    out_ref = dense.to_dense(Backend.batch_norm(dense, dense.from_dense(x, active), ref))
    assert rel_err(out.float(), out_ref.float()) < tol


def test_dense_batch_norm_refuses_a_single_active_site_as_bn_does():
    dense = backend_or_skip("dense")
    active = torch.zeros(2, 3, 3, dtype=torch.bool)
    active[1, 2, 0] = True
    x = dense.from_dense(torch.randn(2, 4, 3, 3), active)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        Backend.batch_norm(dense, x, nn.BatchNorm2d(4))
    with pytest.raises(RuntimeError, match="more than 1 active site"):
        dense.batch_norm(x, nn.BatchNorm2d(4))


# ---- strided conv and max pool at given output sites ---------------------------------------------------
def _case(b, h, w, stride, seed):
    """Input, active input sites (sample 1 has none), active output sites (some whose window holds no
    active input: the bottom-right quarter of the input is inactive)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 5, h, w, generator=g)
    active = random_active(b, h, w, 0.5, seed=seed, empty_sample=1)
    active[:, h // 2:, w // 2:] = False
    active_out = random_active(b, -(-h // stride), -(-w // stride), 0.7, seed=seed + 1)
    return x, active, active_out


def _check_sites(backend, t, active_out, stride):
    sb = backend.to_sparse(t)
    assert torch.equal(sb.active_mask(), active_out) and sb.stride == stride


@pytest.mark.parametrize("k, stride, hw", [(3, 2, (9, 12)), (1, 2, (8, 7)), (7, 2, (11, 8)), (3, 1, (6, 5))])
def test_strided_conv_equals_conv2d_at_output_sites(backend, k, stride, hw):
    x, active, active_out = _case(3, *hw, stride, seed=k)
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(4, 5, k, k, generator=g), torch.randn(4, generator=g)
    ours, ref = _leaves(x, w, b), _leaves(x, w, b)
    t = backend.strided_conv(backend.from_dense(ours[0], active), ours[1], ours[2], stride, padding=k // 2,
                             active_out_bhw=active_out)
    out = backend.to_dense(t)
    expected = F.conv2d(ref[0] * active.unsqueeze(1), ref[1], ref[2], stride=stride, padding=k // 2)
    expected = expected * active_out.unsqueeze(1)
    assert out.shape == expected.shape
    assert rel_err(out, expected) < TOL
    _check_sites(backend, t, active_out, stride)
    _backward(out), _backward(expected)
    for a, r in zip(ours, ref):
        assert rel_err(a.grad, r.grad) < TOL


@pytest.mark.parametrize("k, stride, hw", [(3, 2, (9, 12)), (3, 2, (8, 8)), (1, 2, (7, 6)), (5, 3, (10, 7))])
def test_max_pool_takes_the_max_over_active_sites(backend, k, stride, hw):
    x, active, active_out = _case(3, *hw, stride, seed=k + 10)
    (ours,), (ref,) = _leaves(x), _leaves(x)
    t = backend.max_pool(backend.from_dense(ours, active), k, stride, active_out)
    out = backend.to_dense(t)
    # independent: -inf at inactive sites, max_pool2d, windows without an active site -> 0
    pooled = F.max_pool2d(ref.masked_fill(~active.unsqueeze(1), float("-inf")), k, stride, padding=k // 2)
    expected = torch.where(torch.isinf(pooled), torch.zeros_like(pooled), pooled) * active_out.unsqueeze(1)
    assert torch.isinf(pooled[active_out.unsqueeze(1).expand_as(pooled)]).any()  # the case is exercised
    assert rel_err(out, expected) < TOL
    _check_sites(backend, t, active_out, stride)
    _backward(out), _backward(expected)
    assert rel_err(ours.grad, ref.grad) < TOL


def test_window_ops_refuse_a_mask_of_the_wrong_grid(backend):
    x, active, _ = _case(2, 8, 8, 2, seed=0)
    t = backend.from_dense(x, active)
    with pytest.raises(ValueError, match=r"output mask \(2, 8, 8\) does not match the output grid \(2, 4, 4\)"):
        backend.strided_conv(t, torch.randn(4, 5, 3, 3), None, 2, padding=1, active_out_bhw=active)
    with pytest.raises(ValueError, match="odd kernel"):
        backend.max_pool(t, 2, 2, active[:, ::2, ::2])
