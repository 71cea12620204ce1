"""Sparse ConvNeXt V2 + FCMAE against timm and hand-written references."""
import pytest
import timm
import torch

from mimsparse.models.build import build_encoder
from mimsparse.config import ConfigError, ModelConfig
from mimsparse.convert import conversion_error
from mimsparse.models.convnextv2 import timm_to_encoder, to_timm
from mimsparse.models.convnextv2 import SparseConvNeXtV2
from mimsparse.models.fcmae import FCMAE
from mimsparse.models.loss import masked_reconstruction_loss, patchify, pixel_targets, unpatchify
from mimsparse.masking import upsample_mask
from tests.helpers import fit_fixed_batch, randomize_, rel_err


@pytest.mark.parametrize("name", ["convnextv2_atto", "convnextv2_tiny"])
def test_encoder_at_ratio_0_equals_timm(name):
    enc = randomize_(SparseConvNeXtV2.from_name(name), seed=1, std=0.05)
    model = timm.create_model(name, num_classes=0)
    model.load_state_dict({k: v for k, v in to_timm(enc.state_dict(), name, 0).items()}, strict=True)
    assert conversion_error(enc, model, img_size=(64, 96)) < 1e-4
    # and back: timm weights -> our encoder give the same features
    enc2 = SparseConvNeXtV2.from_name(name)
    enc2.load_state_dict(timm_to_encoder(model.state_dict(), name), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(enc2(x), model.forward_features(x)) < 1e-4


def test_fcmae_forward_backward_non_square_no_nan():
    torch.manual_seed(0)
    model = FCMAE(SparseConvNeXtV2.from_name("convnextv2_atto", drop_path_rate=0.1), mask_ratio=0.6)
    x = torch.randn(2, 3, 64, 160)
    loss, pred, visible = model(x, generator=torch.Generator().manual_seed(0))
    assert visible.shape == (2, 2, 5) and pred.shape == (2, 10, 32 * 32 * 3)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_all_masked_sample_in_batch_is_finite():
    torch.manual_seed(0)
    model = FCMAE(randomize_(SparseConvNeXtV2.from_name("convnextv2_atto"), std=0.05))
    visible = torch.ones(2, 2, 2, dtype=torch.bool)
    visible[1] = False
    loss, _, _ = model(torch.randn(2, 3, 64, 64), visible)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_patchify_layout_and_inverse():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    patches = patchify(x, 2)
    assert patches.shape == (2, 6, 12)
    # patch (row 0, col 1) of sample 1: pixels rows 0-1, cols 2-3, ordered (row, col, channel)
    manual = torch.stack([x[1, c, r, 2 + q] for r in range(2) for q in range(2) for c in range(3)])
    assert torch.equal(patches[1, 1], manual)
    assert torch.equal(unpatchify(patches, 2, (2, 3), 3), x)


def test_norm_pix_target_and_masked_loss():
    torch.manual_seed(0)
    imgs = torch.randn(2, 3, 64, 64)
    t = pixel_targets(imgs, 32, norm_pix=True)
    p0 = patchify(imgs, 32)[0, 0]
    assert torch.allclose(t[0, 0], (p0 - p0.mean()) / (p0.var(unbiased=True) + 1e-6) ** 0.5, atol=1e-5)
    pred = torch.randn_like(t, requires_grad=True)
    visible = torch.tensor([[True, False, False, True], [False, True, True, True]])
    loss = masked_reconstruction_loss(pred, t, visible)
    manual = sum(((pred[b, i] - t[b, i]) ** 2).mean() for b in range(2) for i in range(4) if not visible[b, i]) / 3
    assert torch.allclose(loss, manual)
    loss.backward()
    assert (pred.grad[visible] == 0).all() and (pred.grad[~visible] != 0).any()
    # changing predictions at visible patches changes nothing
    pred2 = pred.detach().clone()
    pred2[visible] += 100
    assert torch.allclose(masked_reconstruction_loss(pred2, t, visible), loss)


def test_few_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = FCMAE(SparseConvNeXtV2.from_name("convnextv2_atto"), decoder_dim=64, mask_ratio=0.6)
    x = torch.randn(4, 3, 64, 64)
    visible = model.make_mask(x, torch.Generator().manual_seed(0))
    losses = fit_fixed_batch(model, x, visible, lr=4e-3, steps=10)
    assert losses[-1] < 0.9 * losses[0], losses


def test_mask_shape_mismatch_is_a_clear_error():
    enc = SparseConvNeXtV2.from_name("convnextv2_atto")
    with pytest.raises(ValueError, match="not divisible by the patch size 32"):
        enc(torch.randn(1, 3, 64, 80))
    with pytest.raises(ValueError, match="mask shape"):
        enc(torch.randn(1, 3, 64, 64), torch.ones(1, 3, 3, dtype=torch.bool))


def test_stage_geometry_is_derived_from_the_stem_and_the_stages():
    enc = SparseConvNeXtV2.from_name("convnextv2_atto")
    assert enc.stage_dims == (40, 80, 160, 320) and enc.stage_strides == (4, 8, 16, 32) and enc.patch_size == 32
    small = SparseConvNeXtV2(depths=(1, 1, 1), dims=(8, 16, 32), stem_stride=2)
    assert small.stage_strides == (2, 4, 8) and small.patch_size == 8


def test_forward_hierarchical_gives_every_stage_zero_at_masked_sites():
    enc = randomize_(SparseConvNeXtV2.from_name("convnextv2_atto"), seed=5, std=0.05)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(5))
    visible = torch.tensor([[[True, False, True], [False, True, True]], [[False, False, True], [True, False, False]]])
    with torch.no_grad():
        feats = enc.forward_hierarchical(x, visible)
        assert [f.shape for f in feats] == [(2, c, 64 // s, 96 // s) for c, s in zip(enc.stage_dims, enc.stage_strides)]
        for f, s in zip(feats, enc.stage_strides):
            keep = upsample_mask(visible, 32 // s).unsqueeze(1)
            assert (f.masked_fill(keep, 0) == 0).all() and (f.abs().sum(1, keepdim=True)[keep] > 0).all()
        assert torch.equal(feats[-1], enc(x, visible))
        # another backend, the same maps (to_dense at every stage, not only the last)
        enc.backend = "packed"
        assert all(rel_err(a, b) < 1e-4 for a, b in zip(enc.forward_hierarchical(x, visible), feats))
        # no mask = every site visible
        everything = torch.ones(2, 2, 3, dtype=torch.bool)
        assert all(torch.equal(a, b) for a, b in zip(enc.forward_hierarchical(x), enc.forward_hierarchical(x, everything)))


@pytest.mark.parametrize("overrides,message", [
    ({"name": "vit_base"}, r"model.name='vit_base' is not a known encoder; choose one of: convnextv2_atto, .*convnextv2_huge, resnet18, "
                           r"resnet34, resnet50, resnet101$"),
    ({"name": "convnextv2_giant"}, r"model.name='convnextv2_giant' is not a known encoder; choose one of: convnextv2_atto"),
    ({"name": "resnet50", "drop_path": 0.1}, r"model.drop_path=0.1: stochastic depth is implemented for ConvNeXt V2 only"),
])
def test_unknown_encoders_and_convnext_only_settings_are_refused_by_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_encoder(ModelConfig(**overrides))
