"""Official ConvNeXt-V2 checkpoint layouts: import, export, round trips, numerics.

No official weights can be downloaded here, so the official layouts are written out below from the
official source (facebookresearch/ConvNeXt-V2 at 2553895: models/fcmae.py, models/convnextv2_sparse.py,
models/convnextv2.py, models/utils.py), independently of mimsparse/official.py, and filled with random
values. The official forward passes are re-written here from the same source: the dense ones in plain
torch, the sparse encoder with raw MinkowskiEngine modules (when it is installed).
"""
import argparse
import importlib.util
import os

import pytest
import timm
import torch
import torch.nn.functional as F

from mimsparse.models.build import build_fcmae
from mimsparse.config import config_from_dict
from mimsparse.errors import ConversionError
from mimsparse.models.convnextv2 import SparseConvNeXtV2
from mimsparse.models.fcmae import FCMAE
from mimsparse.masking import random_patch_mask, upsample_mask
from mimsparse.models.convnextv2 import get_spec
from mimsparse.convert.official import (encoder_from_official_dense, encoder_to_official_dense, fcmae_from_official,
                                fcmae_to_official, load_official_checkpoint, official_config)
from tests.conftest import ROOT, run_tool, tiny_overrides
from tests.helpers import randomize_, rel_err

NAME = "convnextv2_atto"
DEC_DIM, DEC_DEPTH = 32, 1


# ---- the official layouts, from the official module definitions ----------------------------------
def official_dense_block(prefix: str, dim: int) -> dict:
    """models/convnextv2.py Block: dwconv (Conv2d), norm (LayerNorm), pwconv1, grn (GRN), pwconv2."""
    return {f"{prefix}dwconv.weight": (dim, 1, 7, 7), f"{prefix}dwconv.bias": (dim,),
            f"{prefix}norm.weight": (dim,), f"{prefix}norm.bias": (dim,),
            f"{prefix}pwconv1.weight": (4 * dim, dim), f"{prefix}pwconv1.bias": (4 * dim,),
            f"{prefix}grn.gamma": (1, 1, 1, 4 * dim), f"{prefix}grn.beta": (1, 1, 1, 4 * dim),
            f"{prefix}pwconv2.weight": (dim, 4 * dim), f"{prefix}pwconv2.bias": (dim,)}


def official_fcmae_layout(name: str, dec_dim: int, dec_depth: int, in_chans: int = 3, patch: int = 32) -> dict:
    """models/fcmae.py FCMAE(D=2).state_dict(): key -> shape."""
    spec = get_spec(name)
    dims = spec.dims
    out = {"mask_token": (1, dec_dim, 1, 1),
           "encoder.downsample_layers.0.0.weight": (dims[0], in_chans, 4, 4),   # nn.Conv2d
           "encoder.downsample_layers.0.0.bias": (dims[0],),
           "encoder.downsample_layers.0.1.weight": (dims[0],),                  # LayerNorm channels_first
           "encoder.downsample_layers.0.1.bias": (dims[0],)}
    for i in range(1, 4):
        p = f"encoder.downsample_layers.{i}."
        out.update({p + "0.ln.weight": (dims[i - 1],), p + "0.ln.bias": (dims[i - 1],),   # MinkowskiLayerNorm
                    p + "1.kernel": (4, dims[i - 1], dims[i]), p + "1.bias": (1, dims[i])})  # MinkowskiConvolution k2s2
    for i, (depth, dim) in enumerate(zip(spec.depths, dims)):
        for j in range(depth):
            p = f"encoder.stages.{i}.{j}."
            out.update({p + "dwconv.kernel": (49, dim), p + "dwconv.bias": (1, dim),  # MinkowskiDepthwiseConvolution
                        p + "norm.ln.weight": (dim,), p + "norm.ln.bias": (dim,),
                        p + "pwconv1.linear.weight": (4 * dim, dim), p + "pwconv1.linear.bias": (4 * dim,),
                        p + "pwconv2.linear.weight": (dim, 4 * dim), p + "pwconv2.linear.bias": (dim,),
                        p + "grn.gamma": (1, 4 * dim), p + "grn.beta": (1, 4 * dim)})   # MinkowskiGRN
    out.update({"proj.weight": (dec_dim, dims[-1], 1, 1), "proj.bias": (dec_dim,)})
    for d in range(dec_depth):
        out.update(official_dense_block(f"decoder.{d}.", dec_dim))
    out.update({"pred.weight": (patch * patch * in_chans, dec_dim, 1, 1), "pred.bias": (patch * patch * in_chans,)})
    return out


def official_dense_layout(name: str, num_classes: int | None = None, in_chans: int = 3) -> dict:
    """models/convnextv2.py ConvNeXtV2.state_dict() (without norm/head unless num_classes)."""
    spec = get_spec(name)
    dims = spec.dims
    out = {"downsample_layers.0.0.weight": (dims[0], in_chans, 4, 4), "downsample_layers.0.0.bias": (dims[0],),
           "downsample_layers.0.1.weight": (dims[0],), "downsample_layers.0.1.bias": (dims[0],)}
    for i in range(1, 4):
        out.update({f"downsample_layers.{i}.0.weight": (dims[i - 1],), f"downsample_layers.{i}.0.bias": (dims[i - 1],),
                    f"downsample_layers.{i}.1.weight": (dims[i], dims[i - 1], 2, 2),
                    f"downsample_layers.{i}.1.bias": (dims[i],)})
    for i, (depth, dim) in enumerate(zip(spec.depths, dims)):
        for j in range(depth):
            out.update(official_dense_block(f"stages.{i}.{j}.", dim))
    if num_classes is not None:
        out.update({"norm.weight": (dims[-1],), "norm.bias": (dims[-1],),
                    "head.weight": (num_classes, dims[-1]), "head.bias": (num_classes,)})
    return out


def random_state(layout: dict, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) * 0.1 + (1.0 if k.endswith(("ln.weight", "norm.weight")) else 0.0)
            for k, shape in layout.items()}


def shapes(sd: dict) -> dict:
    return {k: tuple(v.shape) for k, v in sd.items()}


def our_model(seed: int = 0) -> FCMAE:
    model = FCMAE(SparseConvNeXtV2.from_name(NAME), decoder_dim=DEC_DIM, decoder_depth=DEC_DEPTH)
    return randomize_(model, seed=seed, std=0.1)


# ---- the official dense forward passes, in plain torch --------------------------------------------
def ln_channels_first(x, w, b):
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    return w[:, None, None] * ((x - u) / torch.sqrt(s + 1e-6)) + b[:, None, None]


def official_block(x, sd, p):
    """models/convnextv2.py Block.forward (GRN over H, W per sample)."""
    y = F.conv2d(x, sd[p + "dwconv.weight"], sd[p + "dwconv.bias"], padding=3, groups=x.shape[1]).permute(0, 2, 3, 1)
    y = F.layer_norm(y, y.shape[-1:], sd[p + "norm.weight"], sd[p + "norm.bias"], 1e-6)
    y = F.gelu(F.linear(y, sd[p + "pwconv1.weight"], sd[p + "pwconv1.bias"]))
    gx = torch.norm(y, p=2, dim=(1, 2), keepdim=True)
    y = sd[p + "grn.gamma"] * (y * gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)) + sd[p + "grn.beta"] + y
    y = F.linear(y, sd[p + "pwconv2.weight"], sd[p + "pwconv2.bias"]).permute(0, 3, 1, 2)
    return x + y


def official_dense_features(sd, x, depths):
    """ConvNeXtV2.forward_features without the pooling and final norm."""
    x = ln_channels_first(F.conv2d(x, sd["downsample_layers.0.0.weight"], sd["downsample_layers.0.0.bias"], stride=4),
                          sd["downsample_layers.0.1.weight"], sd["downsample_layers.0.1.bias"])
    for i, depth in enumerate(depths):
        if i > 0:
            x = ln_channels_first(x, sd[f"downsample_layers.{i}.0.weight"], sd[f"downsample_layers.{i}.0.bias"])
            x = F.conv2d(x, sd[f"downsample_layers.{i}.1.weight"], sd[f"downsample_layers.{i}.1.bias"], stride=2)
        for j in range(depth):
            x = official_block(x, sd, f"stages.{i}.{j}.")
    return x


def official_decoder(sd, feats, mask_bhw):
    """models/fcmae.py forward_decoder: mask 1 = removed."""
    x = F.conv2d(feats, sd["proj.weight"], sd["proj.bias"])
    m = mask_bhw.unsqueeze(1).type_as(x)
    x = x * (1.0 - m) + sd["mask_token"].repeat(x.shape[0], 1, x.shape[2], x.shape[3]) * m
    d = 0
    while f"decoder.{d}.dwconv.weight" in sd:
        x = official_block(x, sd, f"decoder.{d}.")
        d += 1
    return F.conv2d(x, sd["pred.weight"], sd["pred.bias"])


# ---- layouts and round trips ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["convnextv2_atto", "convnextv2_tiny"])
def test_export_matches_the_official_key_names_and_shapes(name):
    with torch.device("meta"):
        model = FCMAE(SparseConvNeXtV2.from_name(name), decoder_dim=512, decoder_depth=2)
        official = fcmae_to_official(model.state_dict())
        encoder_sd = model.encoder.state_dict()
        dense = encoder_to_official_dense(encoder_sd)
    assert shapes(official) == official_fcmae_layout(name, 512, 2)
    assert shapes(dense) == official_dense_layout(name)
    with_head = encoder_to_official_dense(encoder_sd, num_classes=10)
    assert shapes(with_head) == official_dense_layout(name, 10)


def test_official_to_ours_to_official_is_the_identity():
    official = random_state(official_fcmae_layout(NAME, DEC_DIM, DEC_DEPTH), seed=1)
    cfg = config_from_dict(official_config(official))
    model = build_fcmae(cfg)
    model.load_state_dict(fcmae_from_official(official), strict=True)
    back = fcmae_to_official(model.state_dict())
    assert back.keys() == official.keys()
    assert all(torch.equal(back[k], official[k]) for k in official)


def test_ours_to_official_to_ours_is_the_identity():
    sd = our_model(seed=2).state_dict()
    back = fcmae_from_official(fcmae_to_official(sd))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    enc = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    back = encoder_from_official_dense(encoder_to_official_dense(enc, num_classes=5))
    assert back.keys() == enc.keys() and all(torch.equal(back[k], enc[k]) for k in enc)


def test_official_config_reads_the_architecture_and_args():
    official = random_state(official_fcmae_layout("convnextv2_femto", 64, 2))
    cfg = official_config(official, {"mask_ratio": 0.75, "norm_pix_loss": False, "model": "convnextv2_femto"})
    assert cfg["model"]["name"] == "convnextv2_femto"
    assert (cfg["model"]["decoder_dim"], cfg["model"]["decoder_depth"]) == (64, 2)
    assert cfg["model"]["norm_pix_loss"] is False and cfg["mask"]["ratio"] == 0.75
    with pytest.raises(ConversionError, match="no ConvNeXt V2 size"):
        official_config({k: v for k, v in official.items() if not k.startswith("encoder.stages.2.5.")})


def test_other_objectives_and_foreign_keys_are_refused():
    cfg = config_from_dict({"model": {"decoder": "linear", "encoder_input": "mask_token", "decoder_dim": 32}})
    with pytest.raises(ConversionError, match="model.decoder=fcmae and model.encoder_input=sparse"):
        fcmae_to_official(build_fcmae(cfg).state_dict())
    official = random_state(official_fcmae_layout(NAME, DEC_DIM, DEC_DEPTH))
    official["encoder.stages.0.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError, match="unexpected parameter 'encoder.stages.0.0.extra.weight'"):
        fcmae_from_official(official)


# ---- numerics: the official forward passes on the exported weights equal ours ---------------------
def test_dense_export_equals_ours_in_the_official_forward_and_in_timm():
    model = our_model(seed=3).eval()
    enc = model.encoder
    dense = encoder_to_official_dense(enc.state_dict(), num_classes=7)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = enc(x)
        assert rel_err(official_dense_features(dense, x, get_spec(NAME).depths), ours) < 1e-4
        # timm's own converter for official checkpoints accepts it (strict, head included)
        ref = timm.create_model(NAME, num_classes=7)
        ref.load_state_dict(timm.models.convnext.checkpoint_filter_fn(dense, ref), strict=True)
        assert rel_err(ref.forward_features(x), ours) < 1e-4


def test_official_decoder_on_exported_weights_equals_ours():
    model = our_model(seed=4).eval()
    official = fcmae_to_official(model.state_dict())
    feats = torch.randn(2, model.encoder.num_features, 2, 3, generator=torch.Generator().manual_seed(1))
    visible = random_patch_mask(2, (2, 3), 0.5, torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model.decoder(feats, visible)
        ref = official_decoder(official, feats, (~visible).float())
    assert rel_err(ref, ours) < 1e-5


def _minkowski():
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return pytest.importorskip("MinkowskiEngine")


def _me_tensor(ME, x_bchw, active_bhw):
    coords = active_bhw.nonzero().int().contiguous()  # (b, y, x)
    feats = x_bchw.permute(0, 2, 3, 1)[active_bhw]
    return ME.SparseTensor(feats, coordinates=coords)


def _me_dense(t, shape_bchw, stride):
    out = torch.zeros(shape_bchw)
    c = t.C.long()
    out[c[:, 0], :, c[:, 1] // stride, c[:, 2] // stride] = t.F
    return out


@pytest.mark.minkowski
def test_official_kernels_in_minkowski_ops_equal_our_ops():
    """Exported ME kernels run by MinkowskiConvolution / MinkowskiChannelwiseConvolution equal our
    depthwise and downsampling layers on the dense backend (non-square map, two samples)."""
    ME = _minkowski()
    from mimsparse.backends import get_backend

    model = our_model(seed=5)
    official = fcmae_to_official(model.state_dict())
    backend = get_backend("dense")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 40, 10, 14, generator=g)
    active = torch.rand(2, 10, 14, generator=g) < 0.5
    block = model.encoder.stages[0].blocks[1]
    dw = ME.MinkowskiChannelwiseConvolution(40, kernel_size=7, bias=True, dimension=2)
    with torch.no_grad():
        dw.kernel.copy_(official["encoder.stages.0.1.dwconv.kernel"])
        dw.bias.copy_(official["encoder.stages.0.1.dwconv.bias"])
        ref = _me_dense(dw(_me_tensor(ME, x, active)), (2, 40, 10, 14), 1)
        ours = backend.to_dense(backend.dwconv(backend.from_dense(x, active), block.conv_dw.weight, block.conv_dw.bias))
    assert rel_err(ours, ref) < 1e-5

    conv = ME.MinkowskiConvolution(40, 80, kernel_size=2, stride=2, bias=True, dimension=2)
    down = model.encoder.stages[1].downsample.conv
    with torch.no_grad():
        conv.kernel.copy_(official["encoder.downsample_layers.1.1.kernel"])
        conv.bias.copy_(official["encoder.downsample_layers.1.1.bias"])
        ref = _me_dense(conv(_me_tensor(ME, x, active)), (2, 80, 5, 7), 2)
        ours = backend.to_dense(backend.strided_conv(backend.from_dense(x, active), down.weight, down.bias, 2, padding=0))
    assert rel_err(ours, ref) < 1e-5


def minkowski_official_encoder(ME, sd, image, mask_bl, depths):
    """models/convnextv2_sparse.py SparseConvNeXtV2.forward on stock MinkowskiEngine (channelwise conv
    for the fork's depthwise conv; GRN statistics over the whole batch, as MinkowskiGRN)."""
    b, _, h, w = image.shape
    grid = (h // 32, w // 32)
    x = ln_channels_first(F.conv2d(image, sd["encoder.downsample_layers.0.0.weight"],
                                   sd["encoder.downsample_layers.0.0.bias"], stride=4),
                          sd["encoder.downsample_layers.0.1.weight"], sd["encoder.downsample_layers.0.1.bias"])
    t = _me_tensor(ME, x, upsample_mask(mask_bl.view(b, *grid) == 0, 8))

    def with_feats(t, f):
        return ME.SparseTensor(f, coordinate_map_key=t.coordinate_map_key, coordinate_manager=t.coordinate_manager)

    for i, depth in enumerate(depths):
        if i > 0:
            p = f"encoder.downsample_layers.{i}."
            t = with_feats(t, F.layer_norm(t.F, t.F.shape[-1:], sd[p + "0.ln.weight"], sd[p + "0.ln.bias"], 1e-6))
            kernel = sd[p + "1.kernel"]
            conv = ME.MinkowskiConvolution(kernel.shape[1], kernel.shape[2], kernel_size=2, stride=2, bias=True,
                                           dimension=2)
            conv.kernel.data.copy_(kernel)
            conv.bias.data.copy_(sd[p + "1.bias"])
            t = conv(t)
        for j in range(depth):
            p = f"encoder.stages.{i}.{j}."
            dw = ME.MinkowskiChannelwiseConvolution(t.F.shape[1], kernel_size=7, bias=True, dimension=2)
            dw.kernel.data.copy_(sd[p + "dwconv.kernel"])
            dw.bias.data.copy_(sd[p + "dwconv.bias"])
            y = dw(t)
            f = F.layer_norm(y.F, y.F.shape[-1:], sd[p + "norm.ln.weight"], sd[p + "norm.ln.bias"], 1e-6)
            f = F.gelu(F.linear(f, sd[p + "pwconv1.linear.weight"], sd[p + "pwconv1.linear.bias"]))
            gx = torch.norm(f, p=2, dim=0, keepdim=True)
            f = sd[p + "grn.gamma"] * (f * gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)) + sd[p + "grn.beta"] + f
            f = F.linear(f, sd[p + "pwconv2.linear.weight"], sd[p + "pwconv2.linear.bias"])
            t = with_feats(t, t.F + f)
    return _me_dense(t, (b, t.F.shape[1], *grid), 8)


@pytest.mark.minkowski
def test_official_layout_weights_in_a_minkowski_encoder_equal_ours():
    """An official-layout state dict (random, from the official key list) imported into our model:
    the official sparse encoder on MinkowskiEngine and ours on the dense backend give the same
    features. One sample: the official GRN pools over the batch, ours per sample."""
    ME = _minkowski()
    official = random_state(official_fcmae_layout(NAME, DEC_DIM, DEC_DEPTH), seed=6)
    model = build_fcmae(config_from_dict(official_config(official)))
    model.load_state_dict(fcmae_from_official(official), strict=True)
    image = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(4))
    visible = torch.tensor([[[True, False, True], [True, True, False]]])
    with torch.no_grad():
        ours = model.encoder(image, visible)
        ref = minkowski_official_encoder(ME, official, image, (~visible).flatten(1).float(), get_spec(NAME).depths)
    assert ref.abs().max() > 0 and rel_err(ours, ref) < 1e-4


# ---- files and the tool ---------------------------------------------------------------------------
def test_official_checkpoint_file_with_args_namespace_loads(tmp_path):
    official = random_state(official_fcmae_layout(NAME, DEC_DIM, DEC_DEPTH))
    args = argparse.Namespace(model=NAME, mask_ratio=0.6, norm_pix_loss=True, input_size=224)
    torch.save({"model": official, "optimizer": {"state": {}, "param_groups": []}, "epoch": 799, "args": args},
               tmp_path / "official.pth")
    sd, loaded_args = load_official_checkpoint(tmp_path / "official.pth")
    assert sd.keys() == official.keys() and loaded_args["mask_ratio"] == 0.6


def _tool_main():
    spec = importlib.util.spec_from_file_location("convert_official", ROOT / "tools" / "convert_official.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_import_then_resume_on_another_backend_then_export(photo_dir, tmp_path, capsys):
    from mimsparse.config import load_config
    from mimsparse.train.build import Pretrainer

    tool = _tool_main()  # in-process, except one export run as a user would
    official = random_state(official_fcmae_layout(NAME, DEC_DIM, DEC_DEPTH), seed=7)
    args = argparse.Namespace(model=NAME, mask_ratio=0.6, norm_pix_loss=True)
    torch.save({"model": official, "epoch": 10, "args": args}, tmp_path / "official.pth")
    run = tmp_path / "run"
    assert tool(["import", str(tmp_path / "official.pth"), "--output-dir", str(run), "--data", str(photo_dir),
                 *tiny_overrides(run)]) == 0
    assert "decoder 32x1" in capsys.readouterr().out
    ckpt = torch.load(run / "checkpoint-0000000.pth", weights_only=True)
    assert all(torch.equal(fcmae_to_official(ckpt["model"])[k], official[k]) for k in official)
    # resume pretraining from it on the packed backend
    cfg = load_config(run / "config.yaml", ["train.max_steps=1"])
    result = Pretrainer(cfg, "packed", resume=run / "checkpoint-0000000.pth", show_progress=False).run()
    assert result["history"][0]["loss"] is not None and result["state"].step == 1
    # and export the resumed checkpoint to both official layouts
    run_tool("convert_official.py", "export", str(result["checkpoint"]), "-o", str(tmp_path / "fcmae.pth"))
    assert tool(["export", str(result["checkpoint"]), "-o", str(tmp_path / "dense.pth"), "--dense",
                 "--num-classes", "3"]) == 0
    fcmae = torch.load(tmp_path / "fcmae.pth", weights_only=True)["model"]
    assert shapes(fcmae) == official_fcmae_layout(NAME, DEC_DIM, DEC_DEPTH)
    assert not torch.equal(fcmae["pred.weight"], official["pred.weight"])  # the resumed step trained it
    assert shapes(torch.load(tmp_path / "dense.pth", weights_only=True)["model"]) == official_dense_layout(NAME, 3)


def test_cli_refuses_stray_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _tool_main()(["export", str(tmp_path / "x.pth"), "-o", str(tmp_path / "y.pth"), "train.epochs=3"])
    assert e.value.code == 2 and "unrecognized arguments: train.epochs=3" in capsys.readouterr().err
