"""Pretraining engine: resume, checkpoints, bad input."""
import json

import pytest
import torch

from mimsparse.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mimsparse.config import ConfigError, config_from_dict, load_config
from mimsparse.train.data import DataError
from mimsparse.train.engine import Pretrainer
from mimsparse.train.optim import warmup_cosine
from tests.conftest import run_tool, tiny_overrides


def _cfg(out_dir, photo_dir, **extra):
    return load_config(None, tiny_overrides(out_dir, **{"data.path": str(photo_dir), **extra}))


def test_resume_reproduces_the_uninterrupted_losses(photo_dir, tmp_path):
    full = Pretrainer(_cfg(tmp_path / "full", photo_dir), "dense", show_progress=False).run()
    losses_full = [r["loss"] for r in full["history"]]
    assert len(losses_full) == 6  # 6 images x repeat 2 / batch 4 = 3 steps per epoch, 2 epochs

    first = Pretrainer(_cfg(tmp_path / "part", photo_dir, **{"train.max_steps": 2}), "dense", show_progress=False).run()
    ckpt = first["checkpoint"]
    assert ckpt.name == "checkpoint-0000002.pth"
    rest = Pretrainer(_cfg(tmp_path / "part", photo_dir), "dense", resume=ckpt, show_progress=False).run()
    losses_resumed = [r["loss"] for r in first["history"] + rest["history"]]
    assert losses_resumed == losses_full  # exact on CPU with the same seed


def test_checkpoint_contents_and_schedule(photo_dir, tmp_path):
    result = Pretrainer(_cfg(tmp_path, photo_dir, **{"train.keep_last": 1}), "dense", show_progress=False).run()
    ckpt = load_checkpoint(result["checkpoint"])  # weights_only=True inside
    assert {"model", "optimizer", "scheduler", "run", "config", "backend", "versions", "rng"} <= ckpt.keys()
    assert ckpt["run"]["step"] == 6 and ckpt["config"]["model"]["name"] == "convnextv2_atto"
    kept = sorted(p.name for p in tmp_path.glob("checkpoint-*.pth"))
    assert kept == ["checkpoint-0000006.pth", "checkpoint-best.pth"]
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    # lr follows warm-up (3 steps = 1 epoch) then cosine, from lr = base_lr * batch / 256
    peak = 1e-2 * 4 / 256
    expected = [peak * warmup_cosine(s, 3, 6, 0.0) for s in range(6)]
    assert [r["lr"] for r in log] == pytest.approx(expected)


def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "c.pth"
    save_checkpoint({"a": torch.ones(2)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint({"a": Boom()}, path)
    assert torch.equal(load_checkpoint(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]  # no temp file left behind


def test_checkpoint_of_another_model_is_refused(photo_dir, tmp_path):
    result = Pretrainer(_cfg(tmp_path, photo_dir, **{"train.max_steps": 1}), "dense", show_progress=False).run()
    with pytest.raises(CheckpointError, match="trained as 'convnextv2_atto'.*convnextv2_femto"):
        Pretrainer(_cfg(tmp_path / "b", photo_dir, **{"model.name": "convnextv2_femto"}), "dense",
                   resume=result["checkpoint"], show_progress=False)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(result["checkpoint"].read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(truncated)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="unknown config key 'optim.learning_rate'"):
        config_from_dict({"optim": {"learning_rate": 1.0}})
    with pytest.raises(ConfigError, match="unknown config key 'train.epoch'; did you mean 'train.epochs'"):
        load_config(None, ["train.epoch=3"])
    with pytest.raises(ConfigError, match="'train.batch_size' must be int"):
        load_config(None, ["train.batch_size=big"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/nope.yaml")
    assert load_config("configs/fcmae_tiny.yaml").lr() == pytest.approx(1.5e-4 * 4096 / 256)


def test_bad_data_and_sizes(photo_dir, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        Pretrainer(_cfg(tmp_path, tmp_path / "missing"), "dense", show_progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        Pretrainer(_cfg(tmp_path, tmp_path / "empty"), "dense", show_progress=False)
    with pytest.raises(ValueError, match="not divisible by the patch size 32"):
        Pretrainer(_cfg(tmp_path, photo_dir, **{"data.img_size": 200}), "dense", show_progress=False)
    with pytest.raises(ValueError, match=r"mask.ratio must be in \(0, 1\)"):
        Pretrainer(_cfg(tmp_path, photo_dir, **{"mask.ratio": 1.0}), "dense", show_progress=False)


def test_corrupt_image_is_skipped_and_counted(photo_dir, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(photo_dir, data)
    (data / "broken.png").write_bytes((data / "chelsea.png").read_bytes()[:200])
    cfg = _cfg(tmp_path / "run", data, **{"data.repeat": 1, "train.batch_size": 7, "train.epochs": 1})
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        result = Pretrainer(cfg, "dense", show_progress=False).run()
    assert len(result["history"]) == 1
    assert "skipped 1 unreadable image" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_reports_bad_input_in_one_line(tmp_path):
    proc = run_tool("pretrain.py", "--backend", "nonexistent", check=False)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    proc = run_tool("pretrain.py", "--data", str(tmp_path / "missing"), check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: data folder") and "Traceback" not in proc.stderr


def test_a_resume_checkpoint_holds_the_weights_once(photo_dir, tmp_path):
    """What resuming needs and nothing twice: the keys are exactly these, and the file is the weights
    plus AdamW's two moments (3 x 4 bytes per parameter, fp32) with under 0.25 MiB for the rest (run
    position, schedule, RNG, config, zip headers). With decoder_dim 512 as in configs/fcmae_atto.yaml."""
    import os

    run = Pretrainer(_cfg(tmp_path, photo_dir, **{"model.decoder_dim": 512, "train.max_steps": 1}), "dense",
                     show_progress=False)
    path = run.run()["checkpoint"]
    ckpt = load_checkpoint(path)
    assert set(ckpt) == {"model", "optimizer", "scheduler", "scaler", "run", "config", "backend", "versions", "rng"}
    params = sum(p.numel() for p in run.model.parameters())
    assert sum(t.numel() for t in ckpt["model"].values()) == params  # no buffer or alias stored besides them
    tensors = 3 * 4 * params
    assert tensors <= os.path.getsize(path) <= tensors + 0.25 * 2**20, (os.path.getsize(path), tensors)
    assert params == 7_257_992  # convnextv2_atto encoder + 512-wide FCMAE decoder: 83.1 MiB of tensors


def test_non_square_crops_follow_the_target_aspect():
    """data.img_size HxW: the crop boxes' aspect ratios are drawn around W/H, so a whole 2:1 photo can
    become a 32x64 crop (min_scale 1: the full image); torchvision's default ratios (3/4 to 4/3) would cut
    its sides off. Marked left and right edges must both survive."""
    from PIL import Image

    from mimsparse.train.data import pretrain_transform

    img = Image.new("RGB", (256, 128), (128, 128, 128))
    img.paste((255, 0, 0), (0, 0, 16, 128))      # red left edge
    img.paste((0, 0, 255), (240, 0, 256, 128))   # blue right edge
    for seed in range(5):
        torch.manual_seed(seed)
        out = pretrain_transform((32, 64), 1.0)(img)
        assert out.shape == (3, 32, 64)
        edges = out[:, 16, [0, 63]]  # normalised: red has channel 0 high, blue channel 2 high
        assert sorted(int(edges[:, i].argmax()) for i in range(2)) == [0, 2]
