"""bf16 autocast on the dense and packed backends (CPU), against the same model in float32.

Tolerances (stated, measured with margin on convnextv2_atto, 64 px, r = 0.6): bf16 has an 8-bit
mantissa (relative rounding 2^-9 = 0.2 %), the encoder has 12 blocks, so the loss may move by
~0.5 %, whole-network gradients by ~3 % in norm. GRN and LayerNorm statistics are float32 in
both backends, checked separately on one layer where the error must stay at bf16 rounding level."""
from __future__ import annotations

import copy

import pytest
import torch

from mimsparse.backends import get_backend
from mimsparse.models.build import build_fcmae
from mimsparse.config import ModelConfig, PretrainConfig, load_config
from mimsparse.train.build import Pretrainer
from mimsparse.models.convnextv2 import GRN, LayerNorm
from mimsparse.masking import random_patch_mask
from tests.conftest import tiny_overrides
from tests.helpers import randomize_

LOSS_TOL = 0.005    # relative, loss (measured 1e-4 to 2e-4)
GRAD_TOL = 0.03     # relative error in norm over all parameter gradients together (measured 0.9-1.0 %)
IMG, BATCH = 64, 3


def _norm_rel(a: dict, b: dict) -> float:
    num = sum(((a[k].float() - b[k].float()) ** 2).sum() for k in b)
    den = sum((b[k].float() ** 2).sum() for k in b)
    return float((num / den).sqrt())


def _run(model, images, visible, amp: bool, num_visible=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        loss, pred, _ = model(images, visible, num_visible=num_visible)
    loss.backward()
    return loss.detach().float(), pred.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    ref = randomize_(build_fcmae(PretrainConfig(model=ModelConfig(decoder_dim=32)), "dense"), std=0.1)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(BATCH, 3, IMG, IMG, generator=g)
    visible = random_patch_mask(BATCH, (2, 2), 0.6, g)
    return ref, images, visible, _run(ref, images, visible, amp=False)


@pytest.mark.parametrize("backend,static", [("dense", False), ("packed", False), ("packed", True)])
def test_bf16_autocast_close_to_fp32(setup, backend, static):
    ref, images, visible, (loss32, pred32, grads32) = setup
    model = copy.deepcopy(ref)
    model.encoder.backend = backend
    n = model.visible_count((2, 2)) if static else None
    loss16, pred16, grads16 = _run(model, images, visible, amp=True, num_visible=n)
    assert pred16.dtype == torch.bfloat16  # autocast really ran the model in bf16
    assert abs(loss16.item() - loss32.item()) <= LOSS_TOL * loss32.item()
    assert _norm_rel(grads16, grads32) <= GRAD_TOL
    assert all(torch.isfinite(g).all() for g in grads16.values())


def test_bf16_packed_matches_bf16_dense(setup):
    """Same bf16 arithmetic up to summation order: the backends stay interchangeable under autocast."""
    ref, images, visible, _ = setup
    runs = {}
    for name in ("dense", "packed"):
        model = copy.deepcopy(ref)
        model.encoder.backend = name
        runs[name] = _run(model, images, visible, amp=True)
    assert abs(runs["packed"][0].item() - runs["dense"][0].item()) <= LOSS_TOL * runs["dense"][0].item()
    assert _norm_rel(runs["packed"][2], runs["dense"][2]) <= GRAD_TOL


@pytest.mark.parametrize("backend", ["dense", "packed"])
def test_grn_and_layernorm_statistics_in_fp32(backend):
    """bf16 rows whose channels differ by 1e4 in scale: fp32 statistics keep GRN and LayerNorm at
    bf16 rounding error (computed in bf16, the small channels' squares would round away)."""
    g = torch.Generator().manual_seed(0)
    b, h, w, c = 2, 16, 16, 8
    x = torch.randn(b, c, h, w, generator=g) * torch.logspace(-2, 2, c).view(1, c, 1, 1)
    active = torch.rand(b, h, w, generator=g) < 0.5
    grn = GRN(c)
    with torch.no_grad():
        grn.weight.copy_(torch.randn(c, generator=g)), grn.bias.copy_(torch.randn(c, generator=g))
    be = get_backend(backend)
    out32 = be.to_dense(grn(be.from_dense(x, active), be))
    out16 = be.to_dense(grn(be.from_dense(x.bfloat16(), active), be))
    assert out16.dtype == torch.bfloat16
    vnorm = lambda t: torch.linalg.vector_norm(t, dim=(0, 2, 3))
    err = (vnorm(out16.float() - out32) / vnorm(out32)).max().item()
    assert err <= 1e-2, f"GRN per-channel relative error {err:.2e}"
    ln = LayerNorm(c, eps=1e-6)
    rows = x.permute(0, 2, 3, 1)[active] + 1e3  # a large mean: bf16 variance would cancel to garbage
    y16, y32 = ln(rows.bfloat16()), ln(rows.bfloat16().float())
    assert y16.dtype == torch.bfloat16
    assert (y16.float() - y32).abs().max().item() <= 2e-2 * y32.abs().max().item()


@pytest.mark.parametrize("backend", ["dense", "packed"])
def test_train_amp_bf16_on_cpu(photo_dir, tmp_path, backend):
    """train.amp=bf16 is accepted on CPU for dense and packed; 2 steps give the fp32 losses within
    the loss tolerance."""
    losses = {}
    for amp in ("none", "bf16"):
        cfg = load_config(None, tiny_overrides(tmp_path / amp, **{"data.path": str(photo_dir), "train.max_steps": 2,
                                                                  "train.amp": amp}))
        losses[amp] = [r["loss"] for r in Pretrainer(cfg, backend, show_progress=False).run()["history"]]
    assert len(losses["bf16"]) == 2
    assert losses["bf16"] == pytest.approx(losses["none"], rel=LOSS_TOL)
