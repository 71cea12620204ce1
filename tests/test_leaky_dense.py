"""model.encoder_input=masked_image_dense, the papers' leaky dense ablation, against timm's dense
ConvNeXt V2: it is exactly timm's network on the zeroed image, and masked regions take part in it,
while the sparse encoder's visible-site features come from the visible patches alone."""
import pytest
import timm
import torch

from mimsparse.config import ConfigError, load_config
from mimsparse.masking import upsample_mask
from mimsparse.models.build import build_fcmae
from mimsparse.models.convnextv2 import to_timm
from tests.helpers import randomize_, rel_err


def _models(backend: str):
    """(leaky FCMAE, sparse FCMAE with the same weights, timm convnextv2_atto strict-loaded from them)."""
    leaky = build_fcmae(load_config(None, ["model.encoder_input=masked_image_dense"]), backend)
    randomize_(leaky.encoder, seed=3)  # GRN and biases start at zero, which would hide a wrong path
    sparse = build_fcmae(load_config(None, []), backend)
    sparse.load_state_dict(leaky.state_dict())
    dense = timm.create_model("convnextv2_atto", num_classes=0)
    dense.load_state_dict(to_timm(leaky.encoder.state_dict(), "convnextv2_atto", num_classes=0), strict=True)
    return leaky.eval(), sparse.eval(), dense.eval()


def _image_and_mask():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 96, 96, generator=g)
    visible = torch.zeros(2, 3, 3, dtype=torch.bool)
    visible[0, 1, 1] = True               # sample 0: only the centre patch is visible
    visible[1, 0, :2] = visible[1, 2, 2] = True
    return images, visible


@pytest.mark.parametrize("backend", ["dense", "packed"])
@torch.no_grad()
def test_leaky_encoder_is_timms_dense_model_on_the_zeroed_image(backend):
    leaky, _, dense = _models(backend)
    images, visible = _image_and_mask()
    zeroed = images * upsample_mask(visible, 32).unsqueeze(1)
    ours = leaky.forward_encoder(images, visible)
    ref = dense.forward_features(zeroed)
    assert ours.shape == ref.shape == (2, 320, 3, 3)
    assert rel_err(ours, ref) < 1e-4
    # Unlike the sparse encoder, it computes features at masked patches: they are not zero.
    assert (ours.abs().sum(1)[~visible] > 0).all()


@pytest.mark.parametrize("backend", ["dense", "packed"])
@torch.no_grad()
def test_leaky_visible_features_depend_on_masked_regions_sparse_do_not(backend):
    leaky, sparse, dense = _models(backend)
    images, visible = _image_and_mask()
    # The sparse encoder's feature at a lone visible patch is timm's dense network on that 32x32 patch alone:
    # masked neighbours contribute exactly what zero padding does, and LN/GRN never see them.
    alone = dense.forward_features(images[:1, :, 32:64, 32:64])[:, :, 0, 0]
    assert rel_err(sparse.forward_encoder(images, visible)[0, :, 1, 1], alone[0]) < 1e-4
    # The leaky encoder's is not: the masked regions' content (zero pixels, then features computed there by
    # the dense convs from the visible patches' spread) reaches the visible site.
    assert rel_err(leaky.forward_encoder(images, visible)[0, :, 1, 1], alone[0]) > 0.05

    # What the masked patches hold changes the leaky model's visible features: the same visible pixels with
    # the masked patches at 0.5 instead of its 0 (the normalised mean colour; timm's network on that image) ...
    keep = upsample_mask(visible, 32).unsqueeze(1)
    filled = dense.forward_features(torch.where(keep, images, torch.full_like(images, 0.5)))
    zeroed = leaky.forward_encoder(images, visible)
    assert rel_err(zeroed.permute(0, 2, 3, 1)[visible], filled.permute(0, 2, 3, 1)[visible]) > 0.05
    # ... while the sparse model's visible features are the same whatever the masked patches hold.
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(1)) * 3
    other = torch.where(keep, images, noise)
    a, b = sparse.forward_encoder(images, visible), sparse.forward_encoder(other, visible)
    assert torch.equal(a.permute(0, 2, 3, 1)[visible], b.permute(0, 2, 3, 1)[visible])
    # The target pixels themselves never leak into either: the leaky input is zeroed before the encoder.
    assert torch.equal(leaky.forward_encoder(images, visible), leaky.forward_encoder(other, visible))


def test_leaky_trains_and_is_refused_when_misspelt():
    model = build_fcmae(load_config(None, ["model.encoder_input=masked_image_dense"]), "packed")
    images, visible = _image_and_mask()
    loss, pred, _ = model(images, visible)
    loss.backward()
    assert torch.isfinite(loss) and pred.shape == (2, 9, 32 * 32 * 3)
    assert model.encoder.stem_conv.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="model.encoder_input must be one of sparse, mask_token, masked_image_dense"):
        build_fcmae(load_config(None, ["model.encoder_input=masked_dense"]))
