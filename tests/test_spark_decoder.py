"""SparK decoder: densify per scale, light UNet to full resolution, patch layout, learning, CLI."""
import pytest
import timm
import torch
import torch.nn as nn

from mimsparse.models.build import build_fcmae
from mimsparse.config import ConfigError, load_config
from mimsparse.models.decoders import SparKDecoder
from mimsparse.models.loss import pixel_targets
from mimsparse.masking import random_patch_mask
from mimsparse.visualize import load_image
from tests.conftest import ROOT, run_tool, tiny_overrides
from tests.helpers import fit_fixed_batch, randomize_

SPARK = str(ROOT / "configs" / "fcmae_atto_spark.yaml")


def _model(*overrides):
    torch.manual_seed(0)
    return build_fcmae(load_config(SPARK, ["model.decoder_dim=64", *overrides]))


def _batch(seed, height=64, width=96, batch=2, ratio=0.5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, height, width, generator=g)
    return x, random_patch_mask(batch, (height // 32, width // 32), ratio, g)


class _KnownImage(nn.Module):
    """Stands in for the final 1x1 conv: outputs a fixed image whatever its input."""

    def __init__(self, image_bchw):
        super().__init__()
        self.image_bchw = image_bchw

    def forward(self, x_bchw):
        return self.image_bchw


def test_decoder_sizes_itself_from_the_encoder():
    model = _model()
    dec = model.decoder
    assert isinstance(dec, SparKDecoder) and dec.hierarchical
    assert model.encoder.stage_strides == (4, 8, 16, 32) and model.encoder.stage_dims == (40, 80, 160, 320)
    # widths: 64 at stride 32, halved per x2 upsampling; 1x1 densify projection at the coarsest stage only
    assert [d.proj.weight.shape for d in dec.densify] == [(8, 40, 3, 3), (16, 80, 3, 3), (32, 160, 3, 3), (64, 320, 1, 1)]
    assert [(b.upsample.in_channels, b.convs[-1].num_channels) for b in dec.up] == [(64, 32), (32, 16), (16, 8), (8, 4), (4, 2)]
    assert dec.pred.weight.shape == (3, 2, 1, 1)
    x, visible = _batch(0)
    with torch.no_grad():
        feats = model.forward_encoder(x, visible)
        assert dec.forward_image(feats, visible).shape == (2, 3, 64, 96)


def test_resnet50_config_builds_sparks_model():
    model = build_fcmae(load_config(ROOT / "configs" / "spark_resnet50.yaml"))
    assert model.encoder.stage_dims == (256, 512, 1024, 2048) and model.mask_ratio == 0.6
    # SparK's ResNet-50 decoder: 512 channels at stride 32, 2048 -> 512 by a 1x1 there, 3x3 elsewhere
    assert [tuple(d.proj.weight.shape) for d in model.decoder.densify] == [
        (64, 256, 3, 3), (128, 512, 3, 3), (256, 1024, 3, 3), (512, 2048, 1, 1)]


def test_predictions_are_the_image_cut_like_pixel_targets():
    model = _model()
    x, visible = _batch(1)
    image = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(11))
    model.decoder.pred = _KnownImage(image)
    with torch.no_grad():
        pred = model.forward_decoder(model.forward_encoder(x, visible), visible)
    assert torch.equal(pred, pixel_targets(image, 32, norm_pix=False))
    # and by hand: patch (i, j) in raster order, values ordered (row, col, channel)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                block = image[b, :, 32 * i:32 * i + 32, 32 * j:32 * j + 32].permute(1, 2, 0)
                assert torch.equal(pred[b, 3 * i + j].view(32, 32, 3), block)


def test_densify_fills_exactly_the_masked_sites_of_each_scale_with_its_token():
    model = _model()
    randomize_(model.decoder, seed=2)
    x, visible = _batch(2)
    seen = {}
    for i, densify in enumerate(model.decoder.densify):
        densify.proj.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0]))
    with torch.no_grad():
        feats = model.forward_encoder(x, visible)
        model.forward_decoder(feats, visible)
    for i, (densify, f, stride) in enumerate(zip(model.decoder.densify, feats, model.encoder.stage_strides)):
        token, norm = densify.mask_token[0, :, 0, 0], densify.norm
        _, _, h, w = f.shape
        assert seen[i].shape == f.shape and (h, w) == (64 // stride, 96 // stride)
        for b in range(2):
            for y in range(h):
                for xx in range(w):
                    site = f[b, :, y, xx]
                    if visible[b, y * stride // 32, xx * stride // 32]:
                        normed = (site - site.mean()) / (site.var(unbiased=False) + 1e-6).sqrt() * norm.weight + norm.bias
                        assert torch.allclose(seen[i][b, :, y, xx], normed, atol=1e-5)
                    else:
                        assert (site == 0).all()  # the sparse encoder left it empty
                        assert torch.equal(seen[i][b, :, y, xx], token)


@pytest.mark.parametrize("name", ["convnextv2_atto", "resnet18"])
def test_gradients_reach_every_scale_and_the_encoder(name):
    model = _model(f"model.name={name}")
    x, visible = _batch(3)
    loss, _, _ = model(x, visible)
    loss.backward()
    # every parameter takes part (DDP runs without find_unused_parameters)
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    for densify in model.decoder.densify:
        assert densify.mask_token.grad.abs().sum() > 0 and densify.proj.weight.grad.abs().sum() > 0
    assert [n for n, p in model.encoder.named_parameters() if p.grad.abs().sum() == 0] == []


def test_loss_is_the_mean_over_masked_patches_of_the_normalised_pixel_error():
    model = _model()
    x, visible = _batch(4)
    loss, pred, _ = model(x, visible)
    target = pixel_targets(x, 32, norm_pix=True)
    terms = [((pred[b, i] - target[b, i]) ** 2).mean() for b in range(2) for i in range(6)
             if not visible.flatten(1)[b, i]]
    assert len(terms) == 6 and torch.allclose(loss, sum(terms) / len(terms))


@pytest.mark.parametrize("name, decoder", [("convnextv2_atto", "spark"), ("resnet18", "spark"), ("resnet18", "fcmae")])
def test_each_decoder_learns_on_a_fixed_batch(photo_dir, name, decoder):
    # Real photos: a convolutional full-resolution decoder predicts masked patches from their
    # surroundings, which random noise does not have (FCMAE's per-patch head can memorise noise).
    model = _model(f"model.name={name}", f"model.decoder={decoder}")
    x = torch.cat([load_image(path, (64, 64)) for path in sorted(photo_dir.glob("*.png"))[:4]])
    visible = model.make_mask(x, torch.Generator().manual_seed(0))
    losses = fit_fixed_batch(model, x, visible, lr=1e-2, steps=15)
    assert losses[-1] < 0.9 * losses[0], losses


def test_bad_spark_settings_are_refused_by_key():
    with pytest.raises(ConfigError, match="model.decoder=spark needs model.encoder_input=sparse"):
        _model("model.encoder_input=mask_token")
    with pytest.raises(ConfigError, match="model.decoder_dim=16 is too small for the spark decoder.*at least 32"):
        _model("model.decoder_dim=16")
    with pytest.raises(ConfigError, match="model.decoder_depth=0"):
        _model("model.decoder_depth=0")


@pytest.mark.slow
def test_pretrain_cli_with_spark_then_convert_loads_strict_into_timm(photo_dir, tmp_path):
    run_tool("pretrain.py", "--config", SPARK, "--data", str(photo_dir), "--no-progress",
             *tiny_overrides(tmp_path / "run", **{"train.max_steps": 2}))
    ckpt = tmp_path / "run" / "checkpoint-0000002.pth"
    trained = torch.load(ckpt, weights_only=True)
    assert trained["config"]["model"]["decoder"] == "spark"
    assert "decoder.densify.0.mask_token" in trained["model"]
    out = tmp_path / "dense.pth"
    proc = run_tool("convert_to_dense.py", str(ckpt), "-o", str(out), "--num-classes", "5")
    assert float(proc.stdout.split("mask ratio 0: ")[1].split()[0]) < 1e-4
    model = timm.create_model("convnextv2_atto", num_classes=5)
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    assert torch.equal(model.stem[0].weight, trained["model"]["encoder.stem_conv.weight"])


@pytest.mark.slow
@pytest.mark.minkowski
def test_spark_resnet50_config_trains_resumes_on_another_backend_and_loads_into_torchvision_and_timm(photo_dir, tmp_path):
    """Issue 9's 'done when': configs/spark_resnet50.yaml trains (minkowski), resumes (packed) with the same
    loss the first backend gives for that step, converts, and strict-loads into torchvision and timm."""
    pytest.importorskip("MinkowskiEngine")
    import json

    import torchvision

    config = str(ROOT / "configs" / "spark_resnet50.yaml")
    small = {"model.decoder_dim": 64, "train.epochs": 2, "data.repeat": 1}  # 6 photos, batch 4: 2 steps
    runs = {}
    for name, backend, steps in (("mink", "minkowski", 2), ("ref", "dense", 1)):
        runs[name] = tmp_path / name
        run_tool("pretrain.py", "--config", config, "--backend", backend, "--data", str(photo_dir), "--no-progress",
                 *tiny_overrides(runs[name], **small, **{"train.max_steps": steps}))
    # resume the 1-step dense run on packed: its second step must equal minkowski's second step
    run_tool("pretrain.py", "--config", config, "--backend", "packed", "--data", str(photo_dir), "--no-progress",
             "--resume", "auto", *tiny_overrides(runs["ref"], **small, **{"train.max_steps": 2}))
    losses = {k: [json.loads(line)["loss"] for line in open(v / "log.jsonl") if '"loss"' in line] for k, v in runs.items()}
    assert len(losses["mink"]) == len(losses["ref"]) == 2
    assert losses["ref"] == pytest.approx(losses["mink"], rel=1e-4)

    out = tmp_path / "resnet50.pth"
    proc = run_tool("convert_to_dense.py", str(runs["ref"] / "checkpoint-0000002.pth"), "-o", str(out),
                    "--num-classes", "7")
    assert float(proc.stdout.split("mask ratio 0: ")[1].split()[0]) < 1e-4
    sd = torch.load(out, weights_only=True)
    torchvision.models.resnet50(num_classes=7).load_state_dict(sd, strict=True)
    timm.create_model("resnet50", num_classes=7).load_state_dict(sd, strict=True)
