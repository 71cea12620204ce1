import csv
import math

import pytest
import torch

from mimsparse.evaluate.collapse import channel_cosine_distance
from tests.conftest import run_tool, tiny_overrides


def brute_force(feats, exclude_self=False):
    c = feats.shape[0]
    x = feats.reshape(c, -1).double()
    total = 0.0
    for i in range(c):
        for j in range(c):
            if i == j:
                continue  # self-pair: (1 - 1) / 2 = 0
            cos = torch.dot(x[i], x[j]) / (x[i].norm() * x[j].norm())
            total += (1 - cos.item()) / 2
    return total / (c * (c - 1) if exclude_self else c * c)


def test_identical_and_positively_scaled_channels_give_zero():
    base = torch.randn(1, 5, 6)
    feats = base * torch.tensor([1.0, 2.0, 0.5, 7.0]).view(4, 1, 1)
    assert channel_cosine_distance(feats) == pytest.approx(0.0, abs=1e-12)
    assert channel_cosine_distance(feats, exclude_self=True) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("c", [2, 4, 16])
def test_orthogonal_channels(c):
    feats = torch.eye(c).reshape(c, c, 1) * 3.0  # one-hot maps: pairwise cos 0
    assert channel_cosine_distance(feats, exclude_self=True) == pytest.approx(0.5, abs=1e-12)
    # the paper's 1/C^2 average counts the C self-pairs as 0
    assert channel_cosine_distance(feats) == pytest.approx((c - 1) / (2 * c), abs=1e-12)


def test_opposite_channels():
    x = torch.randn(1, 4, 4)
    feats = torch.cat([x, -2 * x])
    assert channel_cosine_distance(feats, exclude_self=True) == pytest.approx(1.0, abs=1e-12)
    assert channel_cosine_distance(feats) == pytest.approx(0.5, abs=1e-12)  # 2 pairs of 1, over C^2 = 4


def test_dead_channel_counts_as_orthogonal():
    feats = torch.zeros(3, 2, 2)
    feats[0, 0, 0] = feats[1, 0, 0] = 1.0  # channels 0 and 1 identical, channel 2 all zero
    assert channel_cosine_distance(feats, exclude_self=True) == pytest.approx((0 + 0.5 + 0.5) / 3)
    assert math.isfinite(channel_cosine_distance(torch.zeros(4, 3, 3)))


@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 3), (7, 5, 4), (24, 8, 8)])
def test_matches_brute_force_double_loop(shape, exclude_self):
    g = torch.Generator().manual_seed(sum(shape))
    feats = torch.randn(*shape, generator=g) + 0.3  # a common offset so the answer is far from 1/2
    assert channel_cosine_distance(feats, exclude_self) == pytest.approx(brute_force(feats, exclude_self), abs=1e-10)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        channel_cosine_distance(torch.randn(4, 16))
    with pytest.raises(ValueError):
        channel_cosine_distance(torch.randn(1, 4, 4))


@pytest.mark.slow
def test_cli_on_tiny_pretraining_checkpoint(photo_dir, tmp_path):
    run_tool("pretrain.py", "--data", str(photo_dir), "--no-progress", *tiny_overrides(tmp_path / "run", **{"train.max_steps": 1}))
    ckpt = tmp_path / "run" / "checkpoint-0000001.pth"
    png, table = tmp_path / "collapse.png", tmp_path / "collapse.csv"
    proc = run_tool("feature_collapse.py", str(ckpt), "--images", str(photo_dir), "-o", str(png), "--csv", str(table))
    assert "12 blocks" in proc.stdout
    with open(table) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 + 2 + 6 + 2  # convnextv2_atto depths
    assert {r["model"] for r in rows} == {"checkpoint-0000001"}
    assert [int(r["layer"]) for r in rows] == list(range(12))
    assert [(int(r["stage"]), int(r["block"])) for r in rows][:5] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    assert [int(r["channels"]) for r in rows] == [40] * 2 + [80] * 2 + [160] * 6 + [320] * 2
    assert all(0.0 <= float(r["distance"]) <= 1.0 for r in rows)
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # two checkpoints -> two labelled curves at the MLP expansion (4C channels), on a built-in dataset
    proc = run_tool("feature_collapse.py", str(ckpt), str(ckpt), "--label", "a", "--label", "b", "--where", "mlp",
                    "--images", "lfw-subset", "--num-images", "3", "--img-size", "64", "--csv", str(table),
                    "-o", str(png))
    with open(table) as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == ["a"] * 12 + ["b"] * 12
    assert [int(r["channels"]) for r in rows[:12]] == [160] * 2 + [320] * 2 + [640] * 6 + [1280] * 2
    assert [r["distance"] for r in rows[:12]] == [r["distance"] for r in rows[12:]]
    assert "3 images, 2 model(s)" in proc.stdout
    proc = run_tool("feature_collapse.py", str(ckpt), str(ckpt), "--label", "a", check=False)
    assert proc.returncode == 2 and "one per checkpoint" in proc.stderr

    # a missing file is one clear error line
    proc = run_tool("feature_collapse.py", str(photo_dir / "nope.pth"), check=False)
    assert proc.returncode == 2 and "error:" in proc.stderr


def test_plain_timm_state_dict_in_process():
    import timm

    from mimsparse.evaluate.collapse import feature_collapse, load_timm_model
    from mimsparse.errors import ConversionError

    torch.manual_seed(0)
    sd = timm.create_model("convnextv2_atto", num_classes=3).state_dict()
    with pytest.raises(ConversionError, match="--model"):
        load_timm_model(sd)
    model, name = load_timm_model(sd, "convnextv2_atto")
    assert name == "convnextv2_atto" and not model.training
    images = torch.randn(3, 3, 64, 64)
    rows = feature_collapse(model, images, batch_size=2)
    assert [(r["stage"], r["block"]) for r in rows] == [(i, j) for i, d in enumerate((2, 2, 6, 2)) for j in range(d)]
    # the hook result equals the metric applied by hand to the block's output, averaged over images
    feats = model.stages[0].blocks[0](model.stem(images))
    expected = sum(channel_cosine_distance(f) for f in feats) / 3
    assert rows[0]["distance"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", ["convnextv2_atto", "convnextv2_tiny"])  # 1x1-conv MLP (NCHW) and Linear MLP (NHWC)
def test_mlp_activation_before_and_after_grn_match_a_hand_computation(name):
    """where="mlp" measures GELU(fc1(LN(dwconv(x)))) of each block, "grn" the GRN of it; both by hand here."""
    import timm
    import torch.nn.functional as F

    from mimsparse.evaluate.collapse import feature_collapse

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=0).eval()
    x = torch.randn(2, 3, 64, 64)
    captured = {}
    blk = model.stages[0].blocks[1]
    handle = blk.register_forward_hook(lambda m, inp, out: captured.setdefault("in", inp[0]))
    rows = feature_collapse(model, x, where="mlp")
    handle.remove()
    h = blk.conv_dw(captured["in"]).permute(0, 2, 3, 1)
    h = F.layer_norm(h, h.shape[-1:], blk.norm.weight, blk.norm.bias, blk.norm.eps)
    w = blk.mlp.fc1.weight.flatten(1)
    act = F.gelu(h @ w.T + blk.mlp.fc1.bias).permute(0, 3, 1, 2)
    expected = sum(channel_cosine_distance(a) for a in act) / 2
    assert rows[1]["channels"] == w.shape[0] == 4 * blk.conv_dw.weight.shape[0]
    assert rows[1]["distance"] == pytest.approx(expected, rel=1e-5)

    # where="grn": the same activation after GRN, x + gamma * (x * Nx) + beta with per-sample statistics
    with torch.no_grad():
        blk.mlp.grn.weight.normal_()
        blk.mlp.grn.bias.normal_()
    rows = feature_collapse(model, x, where="grn")
    gx = act.norm(p=2, dim=(2, 3), keepdim=True)
    nx = gx / (gx.mean(dim=1, keepdim=True) + 1e-6)
    g, b = blk.mlp.grn.weight.view(1, -1, 1, 1), blk.mlp.grn.bias.view(1, -1, 1, 1)
    after = act + g * (act * nx) + b
    expected = sum(channel_cosine_distance(a) for a in after) / 2
    assert rows[1]["distance"] == pytest.approx(expected, rel=1e-4)


def test_analysis_images_from_builtin_dataset():
    from mimsparse.evaluate.collapse import analysis_images

    images = analysis_images("lfw-subset", 32, limit=4)
    assert images.shape == (4, 3, 32, 32)
    # grayscale faces: the three channels hold the same picture before normalisation
    std = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)
    mean = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1)
    raw = images * std + mean
    assert torch.allclose(raw[:, 0], raw[:, 1], atol=1e-5) and torch.allclose(raw[:, 1], raw[:, 2], atol=1e-5)
