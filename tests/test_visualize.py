"""Reconstruction pictures: un-normalising the per-patch targets, the four panels, the PNG grid, the
periodic PNG during training and tools/visualize.py."""
import re
import runpy

import pytest
import torch
from PIL import Image

from mimsparse.models.build import build_fcmae
from mimsparse.cli import run_cli
from mimsparse.config import load_config
from mimsparse.train.build import Pretrainer
from mimsparse.models.loss import pixel_targets
from mimsparse.masking import upsample_mask
from mimsparse.visualize import (MASKED_GRAY, PANELS, grid_image, load_image, normalize, parse_size, pred_to_pixels,
                                 reconstruct, unnormalize)
from tests.conftest import ROOT, run_tool, tiny_overrides


@pytest.mark.parametrize("norm_pix", [True, False])
def test_perfect_predictions_give_back_the_image(norm_pix):
    """pred = the training target of every patch -> pred * sqrt(var + 1e-6) + mean is the image again."""
    images = normalize(torch.rand(2, 3, 64, 96))
    target = pixel_targets(images, 32, norm_pix)
    assert torch.allclose(pred_to_pixels(target, images, 32, norm_pix), images, atol=1e-4)
    assert torch.allclose(unnormalize(images), unnormalize(normalize(unnormalize(images))), atol=1e-6)


def test_panels_paste_and_hide_the_right_patches():
    cfg = load_config(None, ["model.decoder_dim=64"])
    torch.manual_seed(0)
    model = build_fcmae(cfg)
    images = normalize(torch.rand(2, 3, 64, 96))
    visible = model.make_mask(images, torch.Generator().manual_seed(0))
    panels = reconstruct(model, images, visible)
    assert list(panels) == list(PANELS) and model.training  # mode restored
    keep = upsample_mask(visible, 32).unsqueeze(1).expand(-1, 3, -1, -1)
    original = unnormalize(images)
    for name, panel in panels.items():
        assert panel.shape == images.shape and 0 <= panel.min() and panel.max() <= 1, name
    assert torch.equal(panels["original"], original)
    assert torch.equal(panels["masked input"][keep], original[keep])
    assert (panels["masked input"][~keep] == MASKED_GRAY).all()
    pasted, recon = panels["visible pasted back"], panels["reconstruction"]
    assert torch.allclose(pasted[keep], original[keep], atol=1e-6)
    assert torch.equal(pasted[~keep], recon[~keep])
    # with norm_pix_loss every reconstructed patch has its original's mean colour (pred ~ 0 at init)
    assert not torch.equal(recon[keep], original[keep])


def test_grid_image_layout():
    panels = {name: torch.rand(3, 3, 64, 96) for name in PANELS}
    grid = grid_image(panels, gap=4)
    header = grid.height - (3 * (64 + 4) + 4)
    assert grid.size == (4 * (96 + 4) + 4, grid.height) and 10 < header < 40
    px = torch.tensor(list(grid.getpixel((4 + 100 + 10, header + 4 + 10))), dtype=torch.float32) / 255
    assert torch.allclose(px, panels[PANELS[1]][0, :, 10, 10], atol=1 / 255 + 1e-6)


def test_sizes_and_image_loading(photo_dir):
    assert parse_size("224") == (224, 224) and parse_size("192x320") == (192, 320)
    for bad in ("", "0", "axb", "1x2x3"):
        with pytest.raises(ValueError, match="must be N or HxW"):
            parse_size(bad)
    x = load_image(photo_dir / "astronaut.png", (64, 96))
    assert x.shape == (1, 3, 64, 96)
    with pytest.raises(ValueError, match="image size 64x100 is not divisible by the patch size 32"):
        load_image(photo_dir / "astronaut.png", (64, 100))
    with pytest.raises(ValueError, match="does not exist"):
        load_image(photo_dir / "nope.png", (64, 64))


def test_training_writes_reconstruction_pngs(photo_dir, tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, **{"data.path": str(photo_dir), "train.vis_every": 2,
                                                       "train.max_steps": 4}))
    trainer = Pretrainer(cfg, "dense", show_progress=False)
    result = trainer.run()
    pngs = sorted(p.name for p in (tmp_path / "vis").glob("*.png"))
    assert pngs == ["step-0000002.png", "step-0000004.png"]
    with Image.open(tmp_path / "vis" / "step-0000004.png") as img:
        assert img.width == 4 * (64 + 4) + 4 and img.height > 4 * (64 + 4)  # 4 panels x 4 rows (batch 4)
    # drawing the pictures does not change training: same losses as without
    plain = Pretrainer(load_config(None, tiny_overrides(tmp_path / "plain", **{"data.path": str(photo_dir),
                                                                              "train.max_steps": 4})),
                       "dense", show_progress=False).run()
    assert [r["loss"] for r in result["history"]] == [r["loss"] for r in plain["history"]]


@pytest.mark.slow
def test_visualize_tool(photo_dir, tmp_path, capsys):
    cfg = load_config(None, tiny_overrides(tmp_path, **{"data.path": str(photo_dir), "train.max_steps": 1}))
    ckpt = Pretrainer(cfg, "dense", show_progress=False).run()["checkpoint"]
    out = tmp_path / "out.png"
    proc = run_tool("visualize.py", str(ckpt), "--image", str(photo_dir / "astronaut.png"),
                    "--image", str(photo_dir / "chelsea.png"), "--img", "64x96", "-o", str(out))
    assert f"wrote {out}: 2 image(s) at 64x96, 67% of the patches hidden" in proc.stdout  # 4 of 6 patches
    with Image.open(out) as img:
        assert img.width == 4 * (96 + 4) + 4 and img.height > 2 * (64 + 4)
    # bad input: one line on stderr, exit status 2 (run in-process: same main() and error wrapper)
    main = runpy.run_path(str(ROOT / "tools" / "visualize.py"))["main"]
    for args, expected in ((["--img", "100"], r"error: image size 100x100 is not divisible by the patch size 32"),
                           (["--mask-ratio", "1.5"], r"error: .*mask ratio must be in \[0, 1\).*1\.5"),
                           (["--img", "64", "--image", str(photo_dir / "nope.png")], r"error: image '.*nope.png'")):
        assert run_cli(lambda: main([str(ckpt), "--image", str(photo_dir / "astronaut.png"), *args])) == 2
        err = capsys.readouterr().err
        assert re.match(expected, err) and len(err.strip().splitlines()) == 1, err


def test_docs_example_exists():
    with Image.open(ROOT / "docs" / "visualize_example.png") as img:
        assert img.mode == "RGB" and img.width > 4 * 224
