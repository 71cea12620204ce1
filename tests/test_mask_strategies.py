"""Mask strategies (random, block, progressive, importance) against brute-force references."""
import importlib.util

import pytest
import torch

from mimsparse.models.build import build_fcmae
from mimsparse.config import ConfigError, load_config
from mimsparse.masking import (MASK_STRATEGIES, PatchMasker, block_patch_mask, importance_patch_mask,
                               patch_variance, random_patch_mask)
from tests.conftest import ROOT


def _images(b, h, w, seed=0):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("strategy", MASK_STRATEGIES)
@pytest.mark.parametrize("hw,ratio", [((224, 160), 0.6), ((64, 96), 0.75), ((96, 32), 0.5), ((128, 128), 0.9)])
def test_exact_count_on_non_square_grids(strategy, hw, ratio):
    masker = PatchMasker(strategy, ratio=ratio, start_ratio=0.2)
    length = (hw[0] // 32) * (hw[1] // 32)
    for progress in (0.0, 0.37, 1.0):
        visible = masker(_images(5, *hw), 32, torch.Generator().manual_seed(1), progress)
        expected = int(masker.ratio_at(progress) * length + 0.5)
        assert visible.shape == (5, hw[0] // 32, hw[1] // 32) and visible.dtype == torch.bool
        assert ((~visible).flatten(1).sum(1) == expected).all()


@pytest.mark.parametrize("strategy", MASK_STRATEGIES)
def test_seeded_and_varies_between_samples(strategy):
    masker = PatchMasker(strategy)
    x = _images(4, 224, 224)
    a, b, c = (masker(x, 32, torch.Generator().manual_seed(s), 0.5) for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(m.flatten().tolist()) for m in a}) > 1


# ---- block --------------------------------------------------------------------------------------
def test_block_mask_is_the_union_of_its_rectangles():
    visible, blocks = block_patch_mask(50, (9, 13), 0.6, torch.Generator().manual_seed(0), return_blocks=True)
    for b in range(50):
        painted = torch.zeros(9, 13, dtype=torch.bool)
        for top, left, h, w in blocks[b]:
            assert 0 <= top and top + h <= 9 and 0 <= left and left + w <= 13 and h >= 1 and w >= 1
            for y in range(top, top + h):
                for x in range(left, left + w):
                    painted[y, x] = True
        assert torch.equal(painted, ~visible[b])


def _share_in_masked_2x2(masked_bhw):
    """Brute force: the share of masked patches that lie in some fully masked 2x2 square."""
    b, h, w = masked_bhw.shape
    covered = torch.zeros_like(masked_bhw)
    for y in range(h - 1):
        for x in range(w - 1):
            full = masked_bhw[:, y:y + 2, x:x + 2].flatten(1).all(1)
            covered[full, y:y + 2, x:x + 2] = True
    return (covered & masked_bhw).sum().item() / masked_bhw.sum().item()


def test_block_masks_are_contiguous_where_random_ones_are_not():
    # BEiT's setting: 14x14 patches, 40 % masked, blocks of at least 16 patches
    g = torch.Generator().manual_seed(0)
    block = ~block_patch_mask(100, (14, 14), 0.4, g, min_patches=16)
    scattered = ~random_patch_mask(100, (14, 14), 0.4, g)
    assert _share_in_masked_2x2(block) > 0.85 > 0.4 > _share_in_masked_2x2(scattered)


def test_block_shape_options_are_used_and_checked():
    _, blocks = block_patch_mask(20, (14, 14), 0.3, torch.Generator().manual_seed(0), min_patches=9,
                                 min_aspect=1.0, return_blocks=True)
    first = [bl[0] for bl in blocks]  # the first block of each sample has the full budget: never a fallback
    assert all(h == w and h * w >= 9 for _, _, h, w in first)  # aspect 1: squares
    with pytest.raises(ValueError, match="mask.block_min_aspect"):
        block_patch_mask(1, (4, 4), 0.5, min_aspect=0.0)
    with pytest.raises(ValueError, match="mask.block_min_patches"):
        block_patch_mask(1, (4, 4), 0.5, min_patches=0)


# ---- progressive --------------------------------------------------------------------------------
def test_progressive_ratio_follows_the_linear_schedule():
    masker = PatchMasker("progressive", ratio=0.8, start_ratio=0.4)
    assert [masker.ratio_at(t) for t in (0.0, 0.5, 1.0)] == pytest.approx([0.4, 0.6, 0.8])
    assert masker.ratio_at(-1.0) == pytest.approx(0.4) and masker.ratio_at(2.0) == pytest.approx(0.8)
    x = _images(2, 224, 320)  # 70 patches
    counts = [(~masker(x, 32, torch.Generator().manual_seed(0), t)).flatten(1).sum(1).tolist() for t in (0.0, 0.5, 1.0)]
    assert counts == [[28, 28], [42, 42], [56, 56]]
    # the other strategies ignore the progress
    random = PatchMasker("random", ratio=0.8, start_ratio=0.4)
    assert torch.equal(random(x, 32, torch.Generator().manual_seed(0), 0.0),
                       random(x, 32, torch.Generator().manual_seed(0), 1.0))


# ---- importance ---------------------------------------------------------------------------------
def _variance_by_loop(image_chw, p):
    _, h, w = image_chw.shape
    return torch.tensor([[image_chw[:, y * p:(y + 1) * p, x * p:(x + 1) * p].var().item() for x in range(w // p)]
                         for y in range(h // p)])


def test_patch_variance_matches_a_loop():
    x = _images(2, 64, 96)
    ref = torch.stack([_variance_by_loop(img, 32) for img in x])
    assert torch.allclose(patch_variance(x, 32), ref, rtol=1e-5)


def test_importance_masks_the_top_variance_patches_plus_a_random_share():
    g = torch.Generator().manual_seed(0)
    # patches with clearly different variances: noise scaled per patch
    scale = torch.rand(1, 1, 5, 7, generator=g).repeat_interleave(32, 2).repeat_interleave(32, 3)
    x = torch.randn(1, 3, 160, 224, generator=g) * scale
    var = _variance_by_loop(x[0], 32).flatten()
    order = var.argsort(descending=True)
    n_mask = int(0.6 * 35 + 0.5)                    # 21
    n_top = n_mask - int(0.25 * n_mask + 0.5)       # 21 - 5 = 16
    top, rest = set(order[:n_top].tolist()), set(order[n_top:].tolist())
    masker = PatchMasker("importance", ratio=0.6, random_fraction=0.25)
    picked_from_rest = set()
    for seed in range(40):
        masked = set((~masker(x, 32, torch.Generator().manual_seed(seed))).flatten().nonzero().squeeze(1).tolist())
        assert top <= masked and len(masked - top) == n_mask - n_top
        picked_from_rest |= masked - top
    assert picked_from_rest == rest  # the random share reaches every other patch
    # without the random share: exactly the top scores
    pure = importance_patch_mask(var.view(1, 5, 7), 0.6, 0.0, torch.Generator().manual_seed(0))
    assert set((~pure).flatten().nonzero().squeeze(1).tolist()) == set(order[:n_mask].tolist())


def test_importance_breaks_ties_at_random():
    flat = torch.zeros(2, 4, 5)
    masks = [importance_patch_mask(flat, 0.5, 0.0, torch.Generator().manual_seed(s)) for s in range(5)]
    assert all(((~m).flatten(1).sum(1) == 10).all() for m in masks)
    assert len({tuple(m[0].flatten().tolist()) for m in masks}) > 1
    with pytest.raises(ValueError, match="mask.random_fraction"):
        importance_patch_mask(flat, 0.5, 1.5)


# ---- config, model, engine and the PNG tool -------------------------------------------------------
def test_strategies_are_selected_from_config_keys():
    cfg = load_config(None, ["mask.strategy=block", "mask.ratio=0.5", "mask.block_min_patches=2",
                             "mask.block_min_aspect=0.5", "model.decoder_dim=32"])
    model = build_fcmae(cfg)
    assert model.masker == PatchMasker("block", ratio=0.5, block_min_patches=2, block_min_aspect=0.5)
    ref = block_patch_mask(2, (2, 3), 0.5, torch.Generator().manual_seed(0), min_patches=2, min_aspect=0.5)
    assert torch.equal(model.make_mask(_images(2, 64, 96), torch.Generator().manual_seed(0), progress=0.3), ref)
    with pytest.raises(ConfigError, match="mask.strategy must be one of random, block, progressive, importance"):
        build_fcmae(load_config(None, ["mask.strategy=grid"]))
    with pytest.raises(ConfigError, match="mask.random_fraction"):
        build_fcmae(load_config(None, ["mask.strategy=importance", "mask.random_fraction=2"]))
    with pytest.raises(ConfigError, match=r"mask ratio must be in \[0, 1\)"):
        build_fcmae(load_config(None, ["mask.strategy=progressive", "mask.start_ratio=1.0"]))


def test_engine_masks_follow_the_training_progress(photo_dir, tmp_path):
    from mimsparse.train.build import Pretrainer
    from tests.conftest import tiny_overrides

    cfg = load_config(None, tiny_overrides(tmp_path, **{"data.path": str(photo_dir), "mask.strategy": "progressive",
                                                        "mask.start_ratio": 0.25, "mask.ratio": 0.75}))
    trainer = Pretrainer(cfg, "dense", show_progress=False)
    images, seeds = _images(3, 64, 64), torch.tensor([5, 6, 7])
    assert [int((~trainer.make_mask(images, seeds, t)).sum()) for t in (0.0, 1.0)] == [3 * 1, 3 * 3]
    history = trainer.run()["history"]
    assert len(history) == 6 and all(r["loss"] is not None for r in history)


def test_show_masks_writes_a_png(tmp_path, capsys):
    from PIL import Image

    spec = importlib.util.spec_from_file_location("show_masks", ROOT / "tools" / "show_masks.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "masks.png"
    assert tool.main(["-o", str(out), "--img", "64x96", "mask.ratio=0.5"]) == 0
    assert "random 50%" in capsys.readouterr().out
    with Image.open(out) as img:
        width, height = img.size
    assert width > 7 * 96 and height > 64  # 7 panels side by side, titles on top
