"""What a finetuning run leaves and how it continues: held-out validation split for a folder without
train/ and test/, last + best checkpoints with class names, exact --resume, extending a finished run,
warm-up clamping, and tools/predict.py on the result."""
import json
import re
import os
import stat

import pytest
import torch

from mimsparse.convert.export import load_weights_file
from mimsparse.evaluate.datasets import load_labelled
from mimsparse.evaluate.finetune import create_scheduler, held_out_split, warmup_steps
from mimsparse.evaluate.finetune_engine import max_lr
from tests.conftest import run_tool
from tests.test_finetune import image_folder, read_results, tool_main

RUN = ["--checkpoint", "random", "--model", "convnextv2_atto", "--data", "lfw-subset", "--label-fraction", "0.2",
       "--eval-limit", "10", "--img-size", "32", "--batch-size", "8", "--no-progress", "--mixup", "0.8",
       "--warmup-epochs", "0.5"]


def records(out):
    _, log = read_results(out)
    return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in log]


def test_resume_continues_exactly_and_extends_a_finished_run(tmp_path):
    main = tool_main("finetune")
    ema = ["--model-ema", "--model-ema-decay", "0.5"]  # the weight average is restored too
    assert main([*RUN, *ema, "--epochs", "2", "--output-dir", str(tmp_path / "straight")]) == 0
    # stopped after the first epoch (3 steps of 30 images / 8), then resumed: the same run
    assert main([*RUN, *ema, "--epochs", "2", "--max-steps", "3", "--output-dir", str(tmp_path / "split")]) == 0
    last = torch.load(tmp_path / "split" / "last.pth", weights_only=True)
    assert last["epoch"] == 1 and last["step"] == 3 and last["classes"] == ["face", "not face"]
    assert stat.S_IMODE(os.stat(tmp_path / "split" / "last.pth").st_mode) == 0o666 & ~_umask()
    assert main([*RUN, *ema, "--epochs", "2", "--resume", "auto", "--output-dir", str(tmp_path / "split")]) == 0
    assert records(tmp_path / "split") == records(tmp_path / "straight")
    assert all("ema_top1" in r for r in records(tmp_path / "split"))
    a = load_weights_file(tmp_path / "straight" / "best-ema.safetensors")[0]
    b = load_weights_file(tmp_path / "split" / "best-ema.safetensors")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    a = load_weights_file(tmp_path / "straight" / "last.pth")[0]["model"]
    b = load_weights_file(tmp_path / "split" / "last.pth")[0]["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a finished 1-epoch run extended to 2: the new epoch follows the 2-epoch schedule (same lrs as the
    # straight run, not 0 nor the finished run's minimum)
    assert main([*RUN, "--epochs", "1", "--output-dir", str(tmp_path / "ext")]) == 0
    assert main([*RUN, "--epochs", "2", "--resume", "auto", "--output-dir", str(tmp_path / "ext")]) == 0
    ext, straight = records(tmp_path / "ext"), records(tmp_path / "straight")
    assert [r["epoch"] for r in ext] == [0, 1] and ext[1]["step"] == 6
    assert ext[1]["lr"] == pytest.approx(straight[1]["lr"]) and ext[1]["lr"] > 1e-6


def test_plain_lines_every_log_every_steps_with_the_runs_end(tmp_path, capsys):
    """Without a bar (a cluster log), one line every --log-every steps across epochs: the step of the
    run's last one and, from the second step, an ETA; 0 turns them off."""
    import re

    main = tool_main("finetune")
    assert main([*RUN, "--epochs", "2", "--log-every", "2", "--output-dir", str(tmp_path / "a")]) == 0  # 3 + 3 steps
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[:2] for line in lines] == [["step 2", "epoch 0"], ["step 4", "epoch 1"],
                                                         ["step 6", "epoch 1"]]
    assert all(re.search(rf"\| {2 * k}/6 \({100 * 2 * k // 6} %\), eta \d+:\d\d:\d\d$", line)
               for k, line in enumerate(lines, start=1)), lines
    assert main([*RUN, "--epochs", "1", "--log-every", "0", "--output-dir", str(tmp_path / "b")]) == 0
    assert not [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]


def test_bf16_autocast_trains_close_to_fp32_but_not_in_it(tmp_path):
    """--amp bf16 (CPU autocast): the losses follow the fp32 run's to bf16 precision, and differ from
    them, so the forward pass really ran in bf16."""
    main = tool_main("finetune")
    run = [*RUN, "--epochs", "1", "--mixup", "0", "--drop-path", "0"]
    assert main([*run, "--output-dir", str(tmp_path / "fp32")]) == 0
    assert main([*run, "--amp", "bf16", "--output-dir", str(tmp_path / "bf16")]) == 0
    fp32, bf16 = records(tmp_path / "fp32")[0], records(tmp_path / "bf16")[0]
    assert fp32["train_loss"] != bf16["train_loss"] and abs(fp32["train_loss"] - bf16["train_loss"]) < 0.02
    assert abs(fp32["test_loss"] - bf16["test_loss"]) < 0.02
    assert load_weights_file(tmp_path / "bf16" / "last.pth")[0]["model"]["head.fc.weight"].dtype == torch.float32


def test_eval_reproduces_the_runs_top1_from_best_and_last(tmp_path, photo_dir, capsys):
    """--eval on the run folder (best.safetensors) gives the best epoch's recorded top-1, on last.pth the
    final epoch's; a classifier of other classes, or no finetuned classifier at all, is refused."""
    from mimsparse.cli import run_cli

    main = tool_main("finetune")
    out = tmp_path / "ft"
    assert main([*RUN, "--epochs", "2", "--model-ema", "--model-ema-decay", "0.9", "--output-dir", str(out)]) == 0
    results, _ = read_results(out)
    capsys.readouterr()
    evaluate = [*RUN[RUN.index("--data"):RUN.index("--data") + 2], "--eval-limit", "10", "--img-size", "32",
                "--no-progress", "--eval"]
    for checkpoint, expected in ((out, results["best_top1"]), (out / "last.pth", results["final_top1"]),
                                 (out / "best-ema.safetensors", results["best_ema_top1"])):
        assert main(["--checkpoint", str(checkpoint), *evaluate]) == 0
        line = capsys.readouterr().out.strip().splitlines()[-1]
        assert line.startswith(f"test top-1 {expected:.2%} (") and f"/10) | loss " in line, line
    assert sorted(p.name for p in out.iterdir()) == sorted(["best.safetensors", "best-ema.safetensors", "last.pth",
                                                            "results.json", "log.jsonl", ".mimsparse.lock"])
    for args, expected in ((["--checkpoint", "random", "--data", "lfw-subset", "--eval"], "--eval evaluates a "
                            "finetuned classifier"),
                           (["--checkpoint", str(out), "--data", str(image_folder(tmp_path / "ab", photo_dir)),
                             "--eval"], "was finetuned on classes \\['face', 'not face'\\], .* has \\['a', 'b'\\]")):
        assert run_cli(lambda: main(args)) == 2
        assert re.match(f"error: .*{expected}", capsys.readouterr().err)


def test_folder_without_splits_gets_a_held_out_validation_split(tmp_path, photo_dir):
    root = image_folder(tmp_path / "data", photo_dir)  # 12 train + 6 test images per split layout
    flat = tmp_path / "flat"
    for cls in ("a", "b"):
        (flat / cls).mkdir(parents=True)
        for split in ("train", "test"):
            for f in (root / split / cls).iterdir():
                os.link(f, flat / cls / f"{split}-{f.name}")
    data = load_labelled(str(flat))
    train, val = held_out_split(data, 0.25)
    assert len(train) + len(val) == len(data) == 24 and len(val) == 6
    assert set(train.images).isdisjoint(val.images)
    assert torch.bincount(val.labels).tolist() == [3, 3]  # stratified: a quarter of each class
    again, _ = held_out_split(data, 0.25)
    assert train.images == again.images  # seeded: the same split every run
    out = tmp_path / "ft"
    proc = run_tool("finetune.py", "--checkpoint", "random", "--model", "convnextv2_atto", "--data", str(flat),
                    "--val-fraction", "0.25", "--img-size", "32", "--epochs", "1", "--batch-size", "6",
                    "--no-progress", "--output-dir", str(out))
    assert "held-out validation (0.25 of each class, 6 images); 18 training images" in proc.stdout
    results, _ = read_results(out)
    assert results["data"]["train_images"] == 18 and results["data"]["test_images"] == 6
    assert results["data"]["evaluated_on"] == "val"  # the test_* keys hold the held-out validation split
    from tests.test_export import run_load_lines
    (loaded,) = run_load_lines(proc.stdout)  # the printed line loads best.safetensors strictly
    assert not loaded.missing_keys and not loaded.unexpected_keys
    # predict on the held-out images with the saved class names
    pred = run_tool("predict.py", str(out), *map(str, val.images[:2]), "--top-k", "2", "-o", str(tmp_path / "p.json"))
    saved = json.loads((tmp_path / "p.json").read_text())
    assert [r["image"] for r in saved] == [str(p) for p in val.images[:2]]
    model = tool_model(out)
    for r in saved:
        assert [t["class"] for t in r["top"]] != [] and {t["class"] for t in r["top"]} == {"a", "b"}
        assert sum(t["prob"] for t in r["top"]) == pytest.approx(1.0, abs=1e-5)
        assert r["top"][0]["class"] == ["a", "b"][model(r["image"]).argmax()]
        assert f"{r['top'][0]['class']} " in pred.stdout


def tool_model(out):
    """An independent forward of best.safetensors (timm + the eval transform) for one image path."""
    import timm
    from PIL import Image

    from mimsparse.evaluate.loaders import eval_transform

    sd, meta = load_weights_file(out / "best.safetensors")
    assert json.loads(meta["class_names"]) == ["a", "b"] and meta["img_size"] == "32"
    model = timm.create_model(meta["model_name"], num_classes=2).eval()
    model.load_state_dict(sd, strict=True)

    def forward(path):
        with Image.open(path) as img:
            return model(eval_transform(32)(img.convert("RGB"))[None])[0]
    return forward


def test_warmup_as_long_as_training_is_clamped_and_said():
    lines = []
    assert warmup_steps(10, 5, 50, log=lines.append) == 5 and "covers the whole run" in lines[0]
    assert warmup_steps(1, 5, 50, log=lines.append) == 5 and len(lines) == 1
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = create_scheduler(opt, 50, 5, 0.0)
    lrs = []
    for step in range(50):
        sched.step_update(step)
        lrs.append(max_lr(opt))
    assert lrs[5] == pytest.approx(1.0) and lrs[-1] < 0.01  # reaches the peak, then decays


def _umask():
    old = os.umask(0)
    os.umask(old)
    return old


def test_predict_bad_input_gives_one_error_line(tmp_path, capsys):
    from mimsparse.cli import run_cli
    from mimsparse.convert.export import save_weights

    main = tool_main("predict")
    save_weights({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    cases = [([str(tmp_path / "w.safetensors"), "x.png"], "holds no class names: pass the best.safetensors or last.pth"),
             ([str(tmp_path / "none.safetensors"), "x.png"], "does not exist")]
    for argv, expected in cases:
        assert run_cli(lambda: main(argv)) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err and len(err.strip().splitlines()) == 1, err
