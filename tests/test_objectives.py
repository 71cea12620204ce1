"""Objectives (FCMAE/MAE vs SimMIM): losses, targets, linear head, input mask token, config."""
import pytest
import torch
import torch.nn.functional as F

from mimsparse.backends import get_backend
from mimsparse.models.build import build_fcmae
from mimsparse.config import ConfigError, load_config
from mimsparse.models.decoders import FCMAEDecoder, LinearDecoder, SparKDecoder
from mimsparse.models.loss import patchify, pixel_targets, reconstruction_loss, unpatchify
from mimsparse.masking import random_patch_mask
from tests.conftest import ROOT
from tests.helpers import fit_fixed_batch, randomize_, rel_err

SIMMIM = str(ROOT / "configs" / "simmim_atto.yaml")


def _hand_loss(pred, target, visible, kind, on):
    terms = []
    for b in range(pred.shape[0]):
        for i in range(pred.shape[1]):
            if on == "all" or not visible[b, i]:
                d = pred[b, i] - target[b, i]
                terms.append((d * d).mean() if kind == "mse" else d.abs().mean())
    return sum(terms) / len(terms)


@pytest.mark.parametrize("kind", ["mse", "l1"])
@pytest.mark.parametrize("on", ["masked", "all"])
def test_loss_matches_a_hand_written_loop(kind, on):
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 6, 12, generator=g, requires_grad=True), torch.randn(2, 6, 12, generator=g)
    visible = random_patch_mask(2, (2, 3), 0.5, g).flatten(1)
    loss = reconstruction_loss(pred, target, visible, kind, on)
    assert torch.allclose(loss, _hand_loss(pred, target, visible, kind, on))
    loss.backward()
    assert (pred.grad[visible] != 0).any() == (on == "all")
    assert (pred.grad[~visible] != 0).all(dim=-1).all()


def test_l1_masked_equals_simmims_pixel_formula():
    """SimMIM: l1 per pixel, weighted by the pixel-level mask, / (masked pixels) / in_chans."""
    g = torch.Generator().manual_seed(1)
    x, x_rec = torch.randn(2, 3, 64, 96, generator=g), torch.randn(2, 3, 64, 96, generator=g)
    visible = random_patch_mask(2, (2, 3), 0.6, g)
    mask = (~visible).float().repeat_interleave(32, 1).repeat_interleave(32, 2).unsqueeze(1)
    ref = (F.l1_loss(x, x_rec, reduction="none") * mask).sum() / mask.sum() / 3
    ours = reconstruction_loss(patchify(x_rec, 32), pixel_targets(x, 32, norm_pix=False), visible.flatten(1), "l1")
    assert torch.allclose(ours, ref, rtol=1e-5)


def test_targets_with_and_without_per_patch_normalisation():
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    raw = pixel_targets(x, 32, norm_pix=False)
    assert torch.equal(unpatchify(raw, 32, (2, 2), 3), x)
    norm = pixel_targets(x, 32, norm_pix=True)
    patch = x[0, :, 32:, :32]  # patch (1, 0)
    assert torch.allclose(norm[0, 2].std(), (patch.std() / (patch.var() + 1e-6) ** 0.5), atol=1e-4)
    assert torch.allclose(norm[0, 2].mean(), torch.tensor(0.0), atol=1e-5)


def test_linear_head_is_one_1x1_conv():
    head = randomize_(LinearDecoder(40, 32, 3), seed=3)
    feats = torch.randn(2, 40, 2, 3, generator=torch.Generator().manual_seed(3))
    ref = torch.einsum("oc,bchw->bohw", head.pred.weight[:, :, 0, 0], feats) + head.pred.bias.view(1, -1, 1, 1)
    assert rel_err(head(feats, torch.ones(2, 2, 3, dtype=torch.bool)), ref) < 1e-5
    assert sum(p.numel() for p in head.parameters()) == 40 * 3072 + 3072


def _tiny(overrides=(), config=SIMMIM):
    return build_fcmae(load_config(config, ["model.decoder_dim=32", *overrides]))


def test_mask_token_input_replaces_the_masked_pixels():
    torch.manual_seed(0)
    model = _tiny().eval()
    randomize_(model.encoder, seed=4, std=0.05)
    with torch.no_grad():
        model.input_mask_token.normal_()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 64, 96, generator=g)
    visible = random_patch_mask(2, (2, 3), 0.5, g)
    # reference input built patch by patch: the 4x4 token tiled over each masked 32x32 patch
    filled = x.clone()
    for b, i, j in (~visible).nonzero().tolist():
        filled[b, :, 32 * i:32 * i + 32, 32 * j:32 * j + 32] = model.input_mask_token[0].repeat(1, 8, 8)
    with torch.no_grad():
        feats = model.forward_encoder(x, visible)
        assert rel_err(feats, model.encoder(filled)) < 1e-6
        # the encoder sees every site, but nothing of the pixels it must predict
        assert (feats.abs().sum(1) > 0).all()
        hidden = x + 5.0 * (~visible).float().repeat_interleave(32, 1).repeat_interleave(32, 2).unsqueeze(1)
        assert torch.equal(model.forward_encoder(hidden, visible), feats)


def test_simmim_config_end_to_end_loss_and_gradients():
    torch.manual_seed(0)
    model = _tiny()
    assert isinstance(model.decoder, LinearDecoder) and model.input_mask_token is not None
    assert (model.loss, model.loss_on, model.norm_pix_loss) == ("l1", "masked", False)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(5))
    loss, pred, visible = model(x, generator=torch.Generator().manual_seed(5))
    target = patchify(x, 32)
    assert torch.allclose(loss, _hand_loss(pred, target, visible.flatten(1), "l1", "masked"))
    loss.backward()
    assert model.input_mask_token.grad.abs().sum() > 0 and model.decoder.pred.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("overrides,kind", [
    ([], "fcmae"),
    (["model.loss=l1", "model.loss_on=all", "model.norm_pix_loss=false"], "fcmae"),
    (["model.decoder=linear", "model.encoder_input=mask_token"], "linear"),
    (["model.decoder=spark"], "spark"),
    (["model.decoder=spark", "model.loss=l1", "model.loss_on=all", "model.norm_pix_loss=false"], "spark"),
])
def test_every_combination_is_selectable_and_computes_its_loss(overrides, kind):
    torch.manual_seed(0)
    model = _tiny(overrides, config=None)
    assert isinstance(model.decoder, {"fcmae": FCMAEDecoder, "linear": LinearDecoder, "spark": SparKDecoder}[kind])
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    loss, pred, visible = model(x, generator=torch.Generator().manual_seed(6))
    target = pixel_targets(x, 32, model.norm_pix_loss)
    assert torch.allclose(loss, _hand_loss(pred, target, visible.flatten(1), model.loss, model.loss_on), rtol=1e-5)


def test_simmim_learns_on_a_fixed_batch():
    torch.manual_seed(0)
    model = _tiny()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    visible = model.make_mask(x, torch.Generator().manual_seed(7))
    losses = fit_fixed_batch(model, x, visible, lr=2e-3, steps=8)
    assert losses[-1] < 0.9 * losses[0], losses


def test_bad_objectives_are_refused_by_key():
    with pytest.raises(ConfigError, match="model.decoder=linear needs model.encoder_input=mask_token"):
        _tiny(["model.decoder=linear"], config=None)
    for key, value in (("model.loss", "huber"), ("model.loss_on", "visible"), ("model.decoder", "unet"),
                       ("model.encoder_input", "zeros")):
        with pytest.raises(ConfigError, match=f"{key} must be one of"):
            _tiny([f"{key}={value}"], config=None)


@pytest.mark.parametrize("encoder_input", ["mask_token", "masked_image_dense"])
def test_dense_inputs_with_a_static_count_run_packed_static_and_equal_dense(encoder_input):
    """With a dense encoder input every site is active, so a caller's static count (the trainer's
    ``num_visible``) reaches the encoder as all sites: packed runs its sync-free static mode there too."""
    decoder = "linear" if encoder_input == "mask_token" else "fcmae"  # linear needs the mask-token input
    overrides = [f"model.encoder_input={encoder_input}", f"model.decoder={decoder}"]
    torch.manual_seed(0)
    model = randomize_(_tiny(overrides), seed=2, std=0.05)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(7))
    visible = random_patch_mask(2, (2, 3), 0.5, torch.Generator().manual_seed(7))
    n = model.visible_count((2, 3))
    ref = model(x, visible)[0]
    packed = model.encoder.backend = get_backend("packed")
    static = []
    embed = packed.patch_embed
    packed.patch_embed = lambda *a, **k: static.append(embed(*a, **k).geom.static) or embed(*a, **k)
    loss = model(x, visible, num_visible=n)[0]
    assert static == [True]
    assert rel_err(loss, ref) < 1e-5
