import pytest
import torch

from mimsparse.masking import check_image_size, num_masked, random_patch_mask, upsample_mask


@pytest.mark.parametrize("grid,ratio", [((7, 7), 0.6), ((7, 5), 0.75), ((2, 3), 0.5), ((4, 4), 0.0), ((7, 7), 0.9)])
def test_exact_count_per_sample(grid, ratio):
    visible = random_patch_mask(6, grid, ratio, torch.Generator().manual_seed(1))
    length = grid[0] * grid[1]
    expected_masked = int(ratio * length + 0.5)
    assert visible.shape == (6, *grid) and visible.dtype == torch.bool
    assert ((~visible).flatten(1).sum(1) == expected_masked).all()


def test_round_half_up():
    assert num_masked(0.6, 49) == 29  # 29.4
    assert num_masked(0.5, 49) == 25  # 24.5 rounds up, like int(r*L + 0.5)


def test_seeded_and_varies_between_samples():
    a = random_patch_mask(4, (7, 7), 0.6, torch.Generator().manual_seed(3))
    b = random_patch_mask(4, (7, 7), 0.6, torch.Generator().manual_seed(3))
    c = random_patch_mask(4, (7, 7), 0.6, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])


def test_uniform_over_positions():
    visible = random_patch_mask(4000, (2, 2), 0.5, torch.Generator().manual_seed(0))
    freq = visible.float().mean(0)
    assert torch.allclose(freq, torch.full_like(freq, 0.5), atol=0.03)


def test_upsample_matches_kron():
    visible = random_patch_mask(2, (3, 4), 0.5, torch.Generator().manual_seed(0))
    up = upsample_mask(visible, 8)
    ref = torch.kron(visible.int(), torch.ones(8, 8, dtype=torch.int)).bool()
    assert up.shape == (2, 24, 32) and torch.equal(up, ref)


def test_bad_sizes_and_ratios():
    with pytest.raises(ValueError, match="not divisible by the patch size 32"):
        check_image_size(200, 224, 32)
    assert check_image_size(64, 96, 32) == (2, 3)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            random_patch_mask(1, (7, 7), bad)
    with pytest.raises(TypeError, match="must be a number"):
        random_patch_mask(1, (7, 7), "0.6")
