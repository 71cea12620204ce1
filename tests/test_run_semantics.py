"""A run folder is the run (issue 24, items 1, 3, 4): a resume continues under the run's recorded config
with the user's changes said and applied from the step reached; MAE's flags with one precedence rule;
messages that say what happened. End to end through the tools, at 64 px, 3 steps per epoch."""
import json
import math
import shutil

import pytest
import yaml

from mimsparse.config import PretrainConfig
from tests.conftest import run_tool

STEPS = 3  # 6 photos x data.repeat 2 / batch 4


@pytest.fixture(scope="module")
def finished_run(photo_dir, tmp_path_factory):
    """A 2-epoch run made the way the issue made it: --img-size, --batch-size, --data and a changed lr."""
    run = tmp_path_factory.mktemp("made") / "run"
    run_tool("pretrain.py", "--img-size", "64", "--batch-size", "4", "--data", str(photo_dir), "--output-dir",
             str(run), "--no-progress", "optim.base_lr=0.01", "data.repeat=2", "train.epochs=2",
             "model.decoder_dim=64", "train.keep_last=0")
    return run


@pytest.fixture
def run(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _cosine(k: int, warmup: int, total: int) -> float:
    """The lr multiplier of schedule step k, written out (linear warm-up, half cosine to 0)."""
    return (k + 1) / warmup if k < warmup else 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup)))


# ---- 1. resume continues the run -------------------------------------------------------------------
def test_resume_without_config_keeps_the_runs_config_and_says_each_change(run, photo_dir):
    proc = run_tool("pretrain.py", "--output-dir", str(run), "--resume", "auto", "--no-progress", "train.epochs=3")
    out = proc.stdout
    said = [line for line in out.splitlines() if line.startswith("resume: ")]
    # nothing else changed (the copied folder's recorded output_dir is said too)
    assert sorted(line.split(":")[1].strip() for line in said) == ["train.epochs", "train.output_dir"]
    assert "resume: train.epochs: 2 -> 3" in said and said[-1] != "resume: train.output_dir"
    assert "6 images | batch 4 | lr 0.000156 (= base_lr 0.01 x 4/256) | 9 steps" in out
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["data"] == {**cfg["data"], "img_size": 64, "path": str(photo_dir), "repeat": 2}
    assert cfg["train"]["epochs"] == 3 and cfg["optim"]["base_lr"] == 0.01 and cfg["model"]["decoder_dim"] == 64
    record = json.loads((run / "run.json").read_text())
    assert [c["step"] for c in record["config_changes"]] == [6]
    assert record["config_changes"][0]["changes"]["train.epochs"] == [2, 3]
    assert set(record["config_changes"][0]["changes"]) == {"train.epochs", "train.output_dir"}


def test_a_changed_lr_and_length_take_effect_from_the_step_reached(run):
    """--blr and --epochs on resume: the steps run the new schedule at its own position (no lr-0 step,
    no new warm-up), exactly the lr a run of that config from the start has there."""
    run_tool("pretrain.py", "--output-dir", str(run), "--resume", "auto", "--no-progress", "--epochs", "3",
             "--blr", "0.02")
    log = _log(run)
    assert [r["step"] for r in log] == list(range(1, 10))
    new_peak = 0.02 * 4 / 256
    assert [r["lr"] for r in log[6:]] == pytest.approx([new_peak * _cosine(k, 3, 9) for k in (6, 7, 8)])
    assert log[6]["lr"] > 0
    old_peak = 0.01 * 4 / 256  # the first six steps kept theirs
    assert [r["lr"] for r in log[:6]] == pytest.approx([old_peak * _cosine(k, 3, 6) for k in range(6)])


def test_a_batch_size_change_at_an_epoch_boundary_continues_the_schedule_by_epoch(run, tmp_path):
    # back to the end of epoch 1 (step 3): the run's own checkpoint there
    run_tool("pretrain.py", "--output-dir", str(tmp_path / "b"), "--resume", str(run / "checkpoint-0000003.pth"),
             "--no-progress", "--batch-size", "2")
    log = _log(tmp_path / "b")
    peak = 0.01 * 2 / 256  # lr scaling rebuilt from the new batch
    # 6 steps of batch 2 per epoch now; epoch 1 is schedule positions 6..11 of 12 (warm-up: 6)
    assert [r["step"] for r in log] == [4, 5, 6, 7, 8, 9]
    assert [r["lr"] for r in log] == pytest.approx([peak * _cosine(k, 6, 12) for k in range(6, 12)])


def test_a_change_in_the_middle_of_an_epoch_that_recuts_it_is_refused(photo_dir, tmp_path):
    run = tmp_path / "mid"
    run_tool("pretrain.py", "--img-size", "64", "--batch-size", "4", "--data", str(photo_dir), "--output-dir",
             str(run), "--no-progress", "data.repeat=2", "model.decoder_dim=64", "train.max_steps=2")
    proc = run_tool("pretrain.py", "--output-dir", str(run), "--resume", "auto", "--batch-size", "2",
                    "train.max_steps=0", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "train.batch_size can change at an epoch boundary only" in proc.stderr


def test_a_change_of_what_the_weights_mean_is_refused_in_one_line(run):
    before = _run_files(run, lambda p: p.stat().st_mtime_ns)
    proc = run_tool("pretrain.py", "--output-dir", str(run), "--resume", "auto", "model.decoder_dim=32",
                    "train.epochs=3", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "cannot change model.decoder_dim 64 -> 32" in proc.stderr
    assert _run_files(run, lambda p: p.stat().st_mtime_ns) == before


def test_a_resume_with_nothing_left_to_do_writes_nothing(run):
    files = _run_files(run, lambda p: p.read_bytes())
    proc = run_tool("pretrain.py", "--output-dir", str(run), "--resume", "auto", "--no-progress")
    assert "nothing to do" in proc.stdout and "nothing was written" in proc.stdout
    assert _run_files(run, lambda p: p.read_bytes()) == files  # no event file, no config.yaml


def _run_files(run, what) -> dict:
    """``what(file)`` for every file of the run; the lock file is not the run's (it names the latest holder)."""
    from mimsparse.train.run_folder import LOCK_NAME

    return {p: what(p) for p in run.rglob("*") if p.is_file() and p.name != LOCK_NAME}


# ---- 3. familiar flags -----------------------------------------------------------------------------
def _printed_config(*argv):
    return yaml.safe_load(run_tool("pretrain.py", "--print-config", *argv).stdout)


def test_flags_and_overrides_apply_in_order_later_wins(tmp_path):
    assert _printed_config("--batch-size", "2", "train.batch_size=3")["train"]["batch_size"] == 3
    assert _printed_config("train.batch_size=3", "--batch-size", "2")["train"]["batch_size"] == 2
    cfg = _printed_config("--model", "convnextv2_femto", "--epochs", "7", "--blr", "2e-4", "--lr", "0.001",
                          "--mask-ratio", "0.75", "--warmup-epochs", "2", "--weight-decay", "0.1",
                          "--img-size", "64", "--output-dir", str(tmp_path / "never"))
    assert cfg["model"]["name"] == "convnextv2_femto" and cfg["train"]["epochs"] == 7
    assert cfg["optim"] == {**cfg["optim"], "base_lr": 2e-4, "lr": 0.001, "warmup_epochs": 2.0, "weight_decay": 0.1}
    assert cfg["mask"]["ratio"] == 0.75 and cfg["data"]["img_size"] == 64
    assert not (tmp_path / "never").exists()  # --print-config runs nothing


def test_print_config_of_a_resume_shows_the_runs_config(run, photo_dir):
    cfg = _printed_config("--output-dir", str(run), "--resume", "auto", "--epochs", "5")
    assert cfg["data"]["path"] == str(photo_dir) and cfg["train"]["epochs"] == 5 and cfg["train"]["batch_size"] == 4


def test_help_lists_every_config_key_with_its_default():
    text = run_tool("pretrain.py", "--help").stdout
    for section, values in PretrainConfig().to_dict().items():
        for name, default in values.items():
            line = next(line for line in text.splitlines() if line.strip().startswith(f"{section}.{name} = "))
            assert yaml.safe_load(line.split(" = ", 1)[1].split("  [")[0]) == default, line
    assert "--epochs" in text and "needs CUDA" not in text.split("train.amp=fp16")[0]


@pytest.mark.parametrize("option,suggestion", [("--mask_ratio", "--mask-ratio"), ("--base-lr", "optim.base_lr=VALUE"),
                                               ("--epoch", "--epochs")])
def test_an_unknown_option_suggests_the_nearest(option, suggestion):
    proc = run_tool("pretrain.py", option, "0.5", check=False)
    assert proc.returncode == 2 and f"did you mean {suggestion}?" in proc.stderr


def test_an_absolute_lr_is_used_as_given(photo_dir, tmp_path):
    proc = run_tool("pretrain.py", "--img-size", "64", "--batch-size", "4", "--data", str(photo_dir), "--output-dir",
                    str(tmp_path), "--no-progress", "--lr", "0.001", "model.decoder_dim=64", "train.max_steps=1")
    assert "lr 0.001 (= optim.lr)" in proc.stdout


def test_an_export_names_its_model_for_finetuning(tmp_path):
    import timm

    from mimsparse.convert.export import save_weights
    from mimsparse.evaluate.initial_weights import load_weights

    path = tmp_path / "femto.safetensors"
    save_weights(timm.create_model("convnextv2_femto", num_classes=0).state_dict(), path,
                 {"model_name": "convnextv2_femto"})
    assert load_weights(str(path), None, 3).name == "convnextv2_femto"
    with pytest.raises(Exception, match="holds 'convnextv2_femto'.*--model asks for 'convnextv2_atto'"):
        load_weights(str(path), "convnextv2_atto", 3)


# ---- 4. messages that say what happened -------------------------------------------------------------
def test_progress_is_plain_lines_every_log_every_steps_when_output_is_not_a_terminal(photo_dir, tmp_path):
    proc = run_tool("pretrain.py", "--img-size", "64", "--batch-size", "4", "--data", str(photo_dir), "--output-dir",
                    str(tmp_path), "data.repeat=2", "model.decoder_dim=64", "train.epochs=1", "train.log_every=2")
    steps = [line.split(" |")[0] for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert steps == ["step 2"]
    assert "\r" not in proc.stdout + proc.stderr and "it/s" not in proc.stderr


@pytest.mark.parametrize("argv,expected", [
    (["--data", "{photo}"], "is a file; pass a folder of images"),
    (["--data", "{photos}", "--resume", "{yaml}"], "is not a torch checkpoint"),
    (["--data", "{photos}", "--img-size", "200", "--batch-size", "2"], "e.g. --img-size 192"),
])
def test_error_messages_name_the_real_problem(argv, expected, photo_dir, tmp_path):
    (tmp_path / "config.yaml").write_text("train: {epochs: 1}\n")
    values = {"photo": sorted(photo_dir.iterdir())[0], "photos": photo_dir, "yaml": tmp_path / "config.yaml"}
    proc = run_tool("pretrain.py", *[a.format(**values) for a in argv], "--output-dir", str(tmp_path / "o"),
                    check=False)
    assert proc.returncode == 2 and expected in proc.stderr, proc.stderr
    assert "earlier checkpoint" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_convert_refuses_an_unknown_suffix_and_records_the_pretraining_size(finished_run, tmp_path):
    ckpt = finished_run / "checkpoint-0000006.pth"
    proc = run_tool("convert_to_dense.py", str(ckpt), "-o", str(tmp_path / "x.onnx"), check=False)
    assert proc.returncode == 2 and "'.onnx' names no format" in proc.stderr
    assert not (tmp_path / "x.onnx").exists()
    run_tool("convert_to_dense.py", str(ckpt), "-o", str(tmp_path / "timm") + "/", "--no-verify")
    config = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [3, 64, 64]


def test_benchmark_refuses_unknown_backends_and_ratios_with_nothing_visible(tmp_path):
    proc = run_tool("benchmark.py", "--backends", "dense,sparse", "--img-size", "64", "--output-dir",
                    str(tmp_path / "a"), check=False)
    assert proc.returncode == 2 and "unknown backend(s) 'sparse'" in proc.stderr and not (tmp_path / "a").exists()
    proc = run_tool("benchmark.py", "--backends", "dense", "--mask-ratios", "0.9", "--img-size", "64",
                    "--output-dir", str(tmp_path / "b"), check=False)
    assert proc.returncode == 2 and "masks all 4 patches" in proc.stderr and not (tmp_path / "b").exists()


def test_benchmark_reports_the_effective_mask_ratio():
    from mimsparse.benchmark import markdown_table, run_benchmark

    result = run_benchmark("convnextv2_atto", ["dense"], [0.6], batch=1, img=64, repeats=1, warmup=0,
                           log=lambda *_: None, measures=("enc_fwd",))
    row = next(r for r in result["rows"] if r["backend"] == "dense")
    ref = next(r for r in result["rows"] if r["backend"] != "dense")
    assert row["mask_ratio"] == 0.6 and row["effective_mask_ratio"] == 0.5  # round(0.6 x 4) = 2 of 4 patches
    assert row["enc_fwd"]["ratio_to_ideal"] == pytest.approx(row["enc_fwd"]["median_ms"] /
                                                             (ref["enc_fwd"]["median_ms"] * 0.5))
    assert "| dense | 0.50 (asked 0.60) |" in markdown_table(result)


def test_probe_calls_a_held_out_split_validation_not_test(photo_dir, tmp_path):
    for i, photo in enumerate(sorted(photo_dir.iterdir())):  # two classes, no train/ and test/ folders
        (tmp_path / "data" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, tmp_path / "data" / f"c{i % 2}" / photo.name)
    proc = run_tool("linear_probe.py", "random", "--model", "convnextv2_atto", "--data", str(tmp_path / "data"),
                    "--img-size", "64", "--epochs", "1", "--batch-size", "2", "--val-fraction", "0.34",
                    "--output-dir", str(tmp_path / "probe"))
    assert "val images" in proc.stdout and "val top-1" in proc.stdout
    assert "test top-1" not in proc.stdout and "test images" not in proc.stdout
