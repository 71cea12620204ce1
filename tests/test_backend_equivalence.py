"""Whole-model equivalence of every sparse backend with the masked-dense reference: the same weights
and mask give the same encoder output, FCMAE loss and parameter gradients (per-op checks live in
each backend's own test file)."""
import copy

import pytest
import torch

from mimsparse.backends import BackendUnavailable, get_backend
from mimsparse.models.convnextv2 import SparseConvNeXtV2
from mimsparse.models.fcmae import FCMAE
from tests.helpers import random_active, randomize_, rel_err

TOL = 1e-4


@pytest.fixture(params=["packed", "spconv", "minkowski"])
def backend(request):
    try:
        return get_backend(request.param)
    except BackendUnavailable as e:
        pytest.skip(str(e))


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
