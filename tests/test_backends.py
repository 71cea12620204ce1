"""The masked-dense backend against plain torch, and the backend registry."""
import pytest
import torch
import torch.nn.functional as F
from timm.layers.grn import GlobalResponseNorm

from mimsparse.backends import BackendUnavailable, get_backend
from mimsparse.backends.rows import per_sample_l2_norm
from mimsparse.models.convnextv2 import GRN
from tests.helpers import downsample, random_active, rel_err

dense = get_backend("dense")


def _masked(x, active):
    return x * active.unsqueeze(1)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_conv_equals_conv2d_on_masked_input(k):
    x = torch.randn(2, 6, 9, 11)
    active = random_active(2, 9, 11, 0.4, seed=k)
    w, b = torch.randn(5, 6, k, k), torch.randn(5)
    out = dense.to_dense(dense.conv(dense.from_dense(x, active), w, b))
    ref = F.conv2d(_masked(x, active), w, b, padding=k // 2)
    assert rel_err(out, _masked(ref, active)) < 1e-6
    assert out[~active.unsqueeze(1).expand_as(out)].abs().max() == 0


def test_dwconv_and_grads_equal_grouped_conv2d():
    x = torch.randn(2, 8, 10, 6, requires_grad=True)
    active = random_active(2, 10, 6, 0.5, seed=3, empty_sample=1)
    w = torch.randn(8, 1, 7, 7, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    out = dense.to_dense(dense.dwconv(dense.from_dense(x, active), w, b))
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    ref = _masked(F.conv2d(_masked(x2, active), w2, b2, padding=3, groups=8), active)
    assert rel_err(out, ref) < 1e-6
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    for a, r in ((x, x2), (w, w2), (b, b2)):
        assert rel_err(a.grad, r.grad) < 1e-5


def test_downsample_active_set_is_any_of_block():
    x = torch.randn(3, 4, 8, 12)
    active = random_active(3, 8, 12, 0.3, seed=5)
    w, b = torch.randn(7, 4, 2, 2), torch.randn(7)
    out_t = downsample(dense, dense.from_dense(x, active), w, b)
    expected_active = active.view(3, 4, 2, 6, 2).any(dim=(2, 4))
    assert torch.equal(out_t.active_bhw, expected_active) and out_t.stride == 2
    ref = F.conv2d(_masked(x, active), w, b, stride=2)
    assert rel_err(out_t.x_bchw, _masked(ref, expected_active)) < 1e-6


def test_grn_is_per_sample_and_differs_from_batch_wide():
    torch.manual_seed(0)
    x = torch.randn(3, 16, 6, 6)
    active = random_active(3, 6, 6, 0.5, seed=2)
    grn = GlobalResponseNorm(16, channels_last=False)
    grn.weight.data.normal_(), grn.bias.data.normal_()
    ours = GRN(16)
    ours.load_state_dict(grn.state_dict())
    out = dense.to_dense(ours(dense.from_dense(x, active), dense))
    # reference: timm's dense GRN applied to each sample on its own
    ref = torch.cat([_masked(grn(_masked(x[i:i + 1], active[i:i + 1])), active[i:i + 1]) for i in range(3)])
    assert rel_err(out, ref) < 1e-6
    # the official sparse code's batch-wide statistics (issue #86) give a different answer
    xm = _masked(x, active)
    gx_batch = xm.square().sum(dim=(0, 2, 3), keepdim=True).sqrt()
    nx_batch = gx_batch / (gx_batch.mean(dim=1, keepdim=True) + 1e-6)
    batch_wide = _masked(xm + grn.bias.view(1, -1, 1, 1) + grn.weight.view(1, -1, 1, 1) * xm * nx_batch, active)
    assert rel_err(batch_wide, ref) > 1e-2


def test_per_sample_l2_norm_handles_empty_samples():
    feats = torch.randn(10, 4, requires_grad=True)
    batch = torch.tensor([0, 0, 0, 2, 2, 2, 2, 2, 0, 0])
    norm = per_sample_l2_norm(feats, batch, 3)
    ref = torch.stack([torch.linalg.vector_norm(feats[batch == i], dim=0) for i in range(3)])
    assert rel_err(norm, ref) < 1e-6 and (norm[1] == 0).all()
    norm.sum().backward()
    assert torch.isfinite(feats.grad).all()


def test_unknown_backend_lists_available():
    with pytest.raises(BackendUnavailable, match="available backends: dense"):
        get_backend("torchsparse")
