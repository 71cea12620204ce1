"""Linear probe (mimsparse/linear_probe.py, tools/linear_probe.py): cached GAP features, MAE's BN + Linear
head, training to 100 % on separable features, the tool from each kind of weights, bad input."""
import re

import pytest
import timm
import torch

from mimsparse.cli import run_cli
from mimsparse.evaluate.linear_probe import extract_features, probe_head, train_probe
from tests.conftest import run_tool
from tests.test_finetune import image_folder, pretrained_checkpoints, read_results, tool_main

SMOKE = ["--img-size", "32", "--epochs", "2", "--batch-size", "16", "--no-progress"]


@pytest.fixture
def pretrained(tmp_path_factory, photo_dir):
    return pretrained_checkpoints(tmp_path_factory, photo_dir)


def test_features_are_the_global_average_pool_of_forward_features():
    torch.manual_seed(0)
    model = timm.create_model("convnextv2_atto", num_classes=2).train()
    images, labels = torch.randn(5, 3, 64, 64), torch.tensor([0, 1, 1, 0, 1])
    loader = [(images[:3], labels[:3], 0), (torch.empty(0), torch.empty(0, dtype=torch.int64), 2),
              (images[3:], labels[3:], 0)]  # a batch whose images were all unreadable is skipped
    feats, got_labels = extract_features(model, loader, "cpu", show_progress=False)
    assert not model.training  # frozen encoder in eval mode (no drop path, fixed statistics)
    with torch.no_grad():
        manual = model.forward_features(images).mean(dim=(2, 3))
    assert feats.shape == (5, 320) and torch.allclose(feats, manual, atol=1e-6)
    assert torch.equal(got_labels, labels)


def test_probe_head_is_batchnorm_without_affine_then_linear():
    torch.manual_seed(0)
    head = probe_head(320, 7)
    bn, linear = head
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert isinstance(linear, torch.nn.Linear) and (linear.in_features, linear.out_features) == (320, 7)
    assert [p is q for p, q in zip(head.parameters(), (linear.weight, linear.bias))] == [True, True]
    assert linear.weight.std().item() == pytest.approx(0.01, rel=0.1) and not linear.bias.any()


def separable(n, seed):
    """Features [n, 32] of 3 classes, linearly separable with a margin: class y sits at 4 e_y plus noise
    uniform in [-1, 1]^32 (along e_i - e_j the noise spans at most +-1.41 of the 2.83 half-distance).
    Shifted and scaled far from zero mean and unit scale: the BatchNorm must standardise them."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = 2 * torch.rand(n, 32, generator=g) - 1 + 4 * torch.eye(32)[y]
    return x * 50 + 300, y


def test_probe_reaches_100_percent_on_separable_features():
    torch.manual_seed(0)
    train, test = separable(600, 0), separable(300, 1)
    history = train_probe(probe_head(32, 3), train, test, epochs=20, lr=0.1, batch_size=64, warmup_epochs=2, seed=0)
    assert len(history) == 20 and history[-1]["test_top1"] == 1.0
    assert history[0]["test_top1"] < 1.0  # it learned, it did not start there
    # control: shuffled training labels leave nothing to learn, the test accuracy stays near chance (1/3)
    shuffled = (train[0], train[1][torch.randperm(600, generator=torch.Generator().manual_seed(2))])
    control = train_probe(probe_head(32, 3), shuffled, test, epochs=20, lr=0.1, batch_size=64, warmup_epochs=2)
    assert control[-1]["test_top1"] < 0.6


def test_tool_from_pretraining_checkpoint(pretrained, tmp_path):
    out = tmp_path / "lp"
    proc = run_tool("linear_probe.py", "--ckpt", str(pretrained["ckpt"]), "--data", "lfw-subset", "--train-limit", "40",
                    "--output-dir", str(out), *SMOKE)
    assert "converted to timm convnextv2_atto" in proc.stdout and "features [320]" in proc.stdout
    results, log = read_results(out)
    assert results["model"] == "convnextv2_atto" and results["feature_dim"] == 320
    assert results["data"] == {"name": "lfw-subset", "train_images": 40, "train_images_total": 150, "test_images": 50,
                               "evaluated_on": "test"}
    assert len(log) == len(results["history"]) == 2 and [r["epoch"] for r in log] == [0, 1]
    assert all(0.0 <= r["test_top1"] <= 1.0 and r["test_total"] == 50 for r in log)
    assert results["final_top1"] == log[-1]["test_top1"] and results["lr"] == pytest.approx(0.1 * 16 / 256)


def test_tool_from_converted_state_dict_on_image_folder(pretrained, tmp_path, photo_dir):
    data, out = image_folder(tmp_path / "data", photo_dir), tmp_path / "lp"
    proc = run_tool("linear_probe.py", "--ckpt", str(pretrained["dense"]), "--model", "convnextv2_atto",
                    "--data", str(data), "--output-dir", str(out), *SMOKE, "--batch-size", "32")
    assert "replaced the state dict's 1000-class classifier" in proc.stdout
    results, _ = read_results(out)
    assert results["data"]["train_images"] == 18 and results["data"]["test_images"] == 6
    assert results["data"]["evaluated_on"] == "test"
    assert 0.0 <= results["final_top1"] <= 1.0
    # the batch is capped at the 18 training images and the lr follows it
    assert results["lr"] == pytest.approx(0.1 * 18 / 256)


def test_random_init_in_process_is_reproducible(tmp_path):
    main = tool_main("linear_probe")
    runs = []
    for out in (tmp_path / "a", tmp_path / "b"):
        assert main(["--ckpt", "random", "--model", "convnextv2_atto", "--data", "lfw-subset", "--train-limit", "60",
                     "--eval-limit", "20", "--output-dir", str(out), *SMOKE]) == 0
        results, log = read_results(out)
        assert results["weights"] == ["weights: random init (baseline)"] and 0.0 <= results["final_top1"] <= 1.0
        runs.append(log)
    assert runs[0] == runs[1]


def test_bad_input_gives_one_error_line(tmp_path, capsys):
    main = tool_main("linear_probe")
    neither = tmp_path / "neither.pth"
    torch.save({"model": {"w": torch.ones(1)}}, neither)  # a 'model' key without 'config'
    base = ["--data", "lfw-subset", "--output-dir", str(tmp_path / "out"), *SMOKE]
    cases = [
        (["--ckpt", "random", "--model", "convnextv2_atto", "--img-size", "50"], r"--img-size 50 is not a positive "
         r"multiple of 32"),
        (["--ckpt", "random", "--model", "convnextv2_atto", "--train-limit", "-1"], r"--train-limit and --eval-limit"),
        (["--ckpt", str(neither), "--model", "convnextv2_atto"], r"neither a mimsparse pretraining checkpoint"),
        (["--ckpt", "random", "--model", "convnextv2_atto", "--data", str(tmp_path / "nowhere")],
         r"--data '.*nowhere' is neither a folder nor a built-in dataset"),
    ]
    for args, expected in cases:
        assert run_cli(lambda: main([*base, *args])) == 2, args
        err = capsys.readouterr().err
        assert re.match(r"error: .*" + expected, err) and len(err.strip().splitlines()) == 1, err


def test_the_probe_under_torchrun_is_refused_with_how_to_start_it(monkeypatch):
    """Each torchrun process would run the whole probe into one folder: refused before anything loads."""
    from mimsparse.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="the linear probe runs in one process .* start it with python"):
        tool_main("linear_probe")(["--checkpoint", "random", "--model", "convnextv2_atto", "--data", "lfw-subset"])
