"""Nothing lost, nothing silent: run-folder ownership, verified checkpoints, finite-state guards, and one
line (never a traceback) for every fault caused by input or the machine. Each test covers a class of
failure, through the library and, where the wiring matters, through the tools' ``main`` under run_cli."""
import argparse
import dataclasses
import errno
import importlib.util
import json
import os
import shutil
import typing

import pytest
import torch
from PIL import Image

from mimsparse.train.checkpoint import file_sha256, load_checkpoint, save_checkpoint, verify_checkpoint
from mimsparse.train.checkpoint_manager import RUN_FILE, CheckpointManager, step_checkpoints
from mimsparse.cli import parse_with_overrides, run_cli
from mimsparse.config import PretrainConfig, load_config
from mimsparse.train.engine import Pretrainer
from mimsparse.errors import (CheckpointError, ConfigError, DataError, MimsparseError, OutputError, TrainingError)
from mimsparse.train.run_folder import LOCK_NAME
from mimsparse.train.run_log import RunLog
from tests.conftest import ROOT, run_tool, tiny_overrides


def _cfg(out_dir, data_dir, **extra):
    return load_config(None, tiny_overrides(out_dir, **{"data.path": str(data_dir), **extra}))


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _one_line_error(capsys, main) -> str:
    """Run ``main`` under run_cli as the tools do; the error must be exactly one line, no traceback."""
    capsys.readouterr()
    assert run_cli(main) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: ")
    return err.strip()


def _flip(path, offset, count=64):
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _run(tmp_path, photo_dir, name="run", **extra):
    return Pretrainer(_cfg(tmp_path / name, photo_dir, **extra), "dense", show_progress=False).run()


# ---- 1. a run owns its folder ---------------------------------------------------------------------
def test_fresh_run_refuses_a_folder_with_another_runs_checkpoints(photo_dir, tmp_path, capsys):
    _run(tmp_path, photo_dir, **{"train.keep_last": 0})  # a longer run: checkpoints 3 and 6 + best
    run = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in run.glob("checkpoint-*.pth")}
    assert sorted(before) == ["checkpoint-0000003.pth", "checkpoint-0000006.pth", "checkpoint-best.pth"]
    log_before = (run / "log.jsonl").read_text()

    shorter = Pretrainer(_cfg(run, photo_dir, **{"train.max_steps": 1, "train.keep_last": 1}), "dense",
                         show_progress=False)
    with pytest.raises(CheckpointError) as refused:
        shorter.run()
    # the refusal names exactly the files it counts
    assert str(refused.value) == (
        f"output folder '{run}' holds the files of another run (5: checkpoint-0000003.pth, checkpoint-0000006.pth, "
        f"checkpoint-best.pth, log.jsonl, tensorboard/); a new run there would mix with or delete them. Continue "
        f"that run with --resume auto, choose another folder with --output-dir DIR, or replace it with --overwrite")
    # nothing of the other run changed: checkpoints, best, log
    assert {p.name: p.read_bytes() for p in run.glob("checkpoint-*.pth")} == before
    assert (run / "log.jsonl").read_text() == log_before

    # the same through the tool: one line, exit 2
    tool = _tool("pretrain")
    args = ["--data", str(photo_dir), "--no-progress", *tiny_overrides(run, **{"train.max_steps": 1})]
    err = _one_line_error(capsys, lambda: tool.main(args))
    assert "holds the files of another run (5: " in err

    # an import of official weights is a fresh start too (see test_official_import_into_a_used_folder)
    # --overwrite replaces the other run (its checkpoints and log), and says so
    assert tool.main([*args, "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert (f"--overwrite: deleted the previous run's 7 file(s) in {run}: checkpoint-0000003.pth, "
            f"checkpoint-0000006.pth, checkpoint-best.pth, log.jsonl, tensorboard/, run.json, config.yaml") in out
    assert len(list((run / "tensorboard").iterdir())) == 1  # this run's event file alone: no mixed curves
    assert sorted(p.name for p in run.glob("checkpoint-*.pth")) == ["checkpoint-0000001.pth", "checkpoint-best.pth"]
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [1]


def test_rotation_deletes_only_this_runs_exactly_named_checkpoints(photo_dir, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    # the user's files whose names look like checkpoints, and a run folder written before run.json existed
    user_files = {"checkpoint-0000004-mybackup.pth": b"mine", "checkpoint-0000002.pth.bak": b"mine too",
                  "checkpoint-best-old.pth": b"and this"}
    for name, data in user_files.items():
        (run / name).write_bytes(data)
    result = _run(tmp_path, photo_dir, **{"train.keep_last": 1})  # checkpoints 3 then 6: 3 rotated away
    assert result["checkpoint"].is_file()  # the printed path exists
    assert sorted(p.name for p in step_checkpoints(run)) == ["checkpoint-0000006.pth"]
    assert all((run / name).read_bytes() == data for name, data in user_files.items())
    record = json.loads((run / RUN_FILE).read_text())
    assert set(record["checkpoints"]) == {"checkpoint-0000006.pth", "checkpoint-best.pth"}
    assert record["checkpoints"]["checkpoint-0000006.pth"] == file_sha256(result["checkpoint"])

    # a checkpoint this run did not write (a legacy folder: no run.json) is never rotated away
    (run / RUN_FILE).unlink()
    longer = _cfg(run, photo_dir, **{"train.keep_last": 1, "train.epochs": 4})
    resumed = Pretrainer(longer, "dense", resume="auto", show_progress=False)
    assert resumed.resumed_from.name == "checkpoint-0000006.pth"
    resumed.run()
    names = sorted(p.name for p in step_checkpoints(run))
    assert names == ["checkpoint-0000006.pth", "checkpoint-0000012.pth"]  # 9 was its own and rotated; 6 kept
    assert all((run / name).read_bytes() == data for name, data in user_files.items())


def test_official_import_into_a_used_folder_is_refused(photo_dir, tmp_path, capsys):
    from tests.test_official import DEC_DEPTH, DEC_DIM, NAME, official_fcmae_layout, random_state

    torch.save({"model": random_state(official_fcmae_layout(NAME, DEC_DIM, DEC_DEPTH), seed=3),
                "args": argparse.Namespace(mask_ratio=0.6, norm_pix_loss=True)}, tmp_path / "official.pth")
    _run(tmp_path, photo_dir)
    run = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in run.glob("checkpoint-*.pth")}
    tool = _tool("convert_official")
    args = ["import", str(tmp_path / "official.pth"), "--output-dir", str(run), "--data", str(photo_dir),
            *tiny_overrides(run)]
    err = _one_line_error(capsys, lambda: tool.main(args))
    assert "holds the files of another run" in err
    assert {p.name: p.read_bytes() for p in run.glob("checkpoint-*.pth")} == before
    assert tool.main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in run.glob("checkpoint-*.pth")) == ["checkpoint-0000000.pth"]


# ---- 2. verified checkpoints ----------------------------------------------------------------------
def test_corrupted_checkpoints_never_load_silently(photo_dir, tmp_path):
    result = _run(tmp_path, photo_dir, **{"train.max_steps": 1})
    good = result["checkpoint"].read_bytes()
    size = len(good)
    bad = tmp_path / "bad.pth"
    # bytes flipped anywhere in the stored tensors or headers: the zip CRCs (torch.load checks none)
    for offset in (size // 4, size // 2, 3 * size // 4):
        bad.write_bytes(good)
        _flip(bad, offset)
        with pytest.raises(CheckpointError, match=r"checkpoint '.*bad.pth' is (corrupt|damaged|truncated)"):
            load_checkpoint(bad)
    # a file replaced behind the run's back (valid zip, other content): the recorded SHA-256
    manager = CheckpointManager(tmp_path / "run", keep_last=3)
    assert manager.digest(result["checkpoint"]) == file_sha256(result["checkpoint"])
    save_checkpoint({"model": {"w": torch.zeros(1)}}, result["checkpoint"])
    verify_checkpoint(result["checkpoint"])  # intact as a zip ...
    with pytest.raises(CheckpointError, match="SHA-256 differs from the one recorded"):
        manager.load(result["checkpoint"])  # ... but not the file the run wrote
    # empty and truncated files
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"'.*empty.pth' is empty \(0 bytes\)"):
        load_checkpoint(tmp_path / "empty.pth")
    bad.write_bytes(good[: size // 2])
    with pytest.raises(CheckpointError, match="truncated or not a torch checkpoint"):
        load_checkpoint(bad)


def test_a_flip_anywhere_in_a_checkpoint_is_detected(tmp_path):
    """64 flipped bytes at every position of a file (data, zip headers, central directory)."""
    g = torch.Generator().manual_seed(0)
    save_checkpoint({"model": {"w": torch.randn(8000, generator=g), "b": torch.randn(50, generator=g)},
                     "config": {"model": {"name": "x"}}}, tmp_path / "c.pth")
    good = (tmp_path / "c.pth").read_bytes()
    bad = tmp_path / "bad.pth"
    offsets = range(0, len(good) - 64, 53)
    assert len(offsets) > 500
    for offset in offsets:
        bad.write_bytes(good)
        _flip(bad, offset)
        with pytest.raises(CheckpointError, match=r"checkpoint '.*bad.pth' is (corrupt|damaged|truncated)"):
            load_checkpoint(bad)


def test_resume_auto_falls_back_to_the_newest_checkpoint_that_verifies(photo_dir, tmp_path, capsys):
    full = _run(tmp_path, photo_dir, "full", **{"train.epochs": 3})
    part = _run(tmp_path, photo_dir, "part", **{"train.keep_last": 0})  # checkpoints 3, 6
    run = tmp_path / "part"
    _flip(run / "checkpoint-0000006.pth", (run / "checkpoint-0000006.pth").stat().st_size // 2)
    assert part["state"].step == 6
    capsys.readouterr()
    resumed = Pretrainer(_cfg(run, photo_dir, **{"train.epochs": 3}), "dense", resume="auto", show_progress=False)
    out = capsys.readouterr().out
    assert resumed.resumed_from.name == "checkpoint-0000003.pth"
    assert "--resume auto: skipped " in out and "checkpoint-0000006.pth" in out and "corrupt" in out
    rest = resumed.run()  # continues exactly as the uninterrupted run from step 3
    assert [r["loss"] for r in rest["history"]] == [r["loss"] for r in full["history"]][3:]
    # the log holds one record per step, from the kept checkpoint on
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == list(range(1, 10))

    # nothing verifies: one error naming each file and why
    for p in step_checkpoints(run):
        p.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no checkpoint in '.*part' verifies \(checkpoint-0000009.pth: .*empty"):
        Pretrainer(_cfg(run, photo_dir), "dense", resume="auto", show_progress=False)


# ---- 3. finite state ------------------------------------------------------------------------------
def _float_keys():
    keys = []
    for section in dataclasses.fields(PretrainConfig):
        for f in dataclasses.fields(section.default_factory()):
            if typing.get_type_hints(section.default_factory)[f.name] is float:
                keys.append(f"{section.name}.{f.name}")
    return keys


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e999"])
def test_every_float_key_refuses_non_finite_values(value, tmp_path):
    keys = _float_keys()
    assert "optim.base_lr" in keys and "mask.ratio" in keys and len(keys) >= 12
    for key in keys:
        with pytest.raises(ConfigError, match=rf"config key '{key}' must be a finite number"):
            load_config(None, [f"{key}={value}"])
    section, name = keys[0].split(".")
    (tmp_path / "c.yaml").write_text(f"{section}:\n  {name}: {value}\n")
    with pytest.raises(ConfigError, match=rf"'{keys[0]}' must be a finite number"):
        load_config(tmp_path / "c.yaml")


def test_non_finite_weights_stop_training_and_are_never_saved(photo_dir, tmp_path):
    trainer = Pretrainer(_cfg(tmp_path, photo_dir), "dense", show_progress=False)

    def after_step(optimizer, args, kwargs):  # the update of step 5 gives inf weights; its loss was finite
        if trainer.state.step == 4:
            with torch.no_grad():
                next(trainer.model.parameters()).view(-1)[0] = float("inf")

    trainer.optimizer.register_step_post_hook(after_step)
    with pytest.raises(TrainingError, match=r"the update of step 5 \(epoch 1, lr .*\) made weights non-finite; "
                                            r"training stopped and the last good checkpoint '.*checkpoint-0000003.pth"
                                            r"' is kept"):
        trainer.run()
    ckpt = load_checkpoint(tmp_path / "checkpoint-0000003.pth")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())  # the message is true

    # the manager itself refuses to write non-finite weights as a checkpoint
    manager = trainer.checkpoints
    state = trainer.checkpoint_state()
    assert not all(torch.isfinite(v).all() for v in state["model"].values())
    with pytest.raises(TrainingError, match=r"weights at step 4 are not finite \(NaN/inf\); they were not saved and "
                                            r"the last good checkpoint '.*checkpoint-0000003.pth' is kept"):
        manager.save(state, 4)
    assert not (tmp_path / "checkpoint-0000004.pth").exists()

    # a non-finite checkpoint from elsewhere (an older version) is skipped by --resume auto
    state["run"]["step"] = 7
    save_checkpoint(state, tmp_path / "checkpoint-0000007.pth")
    resumed = Pretrainer(_cfg(tmp_path, photo_dir), "dense", resume="auto", show_progress=False)
    assert resumed.resumed_from.name == "checkpoint-0000003.pth"


def test_infinite_learning_rate_is_refused_before_training(photo_dir, tmp_path, capsys):
    tool = _tool("pretrain")
    err = _one_line_error(capsys, lambda: tool.main(["--data", str(photo_dir), *tiny_overrides(tmp_path),
                                                       "optim.base_lr=.inf"]))
    assert err == "error: config key 'optim.base_lr' must be a finite number, got inf"
    assert not list(tmp_path.glob("checkpoint-*"))


# ---- 4. no readable image: an error, never a "trained" run ------------------------------------------
def test_a_run_without_one_readable_image_stops(photo_dir, tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    for i in range(6):
        (junk / f"img{i}.png").write_bytes(b"not a png" * i)  # empty, then garbage
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        with pytest.raises(DataError, match=r"epoch 0: not one readable image in data folder '.*junk' \(12 "
                                            r"unreadable image\(s\) skipped over 3 step\(s\)\); training stopped and "
                                            r"no checkpoint was written yet"):
            Pretrainer(_cfg(tmp_path / "run", junk), "dense", show_progress=False).run()
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_files_vanishing_mid_run_stop_it(photo_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(photo_dir, data)
    trainer = Pretrainer(_cfg(tmp_path / "run", data), "dense", show_progress=False)
    original = trainer.optimizer_step

    def optimizer_step(window):
        record = original(window)
        if trainer.state.step == 3:  # end of epoch 0: every file disappears
            for p in data.iterdir():
                p.unlink()
        return record

    trainer.optimizer_step = optimizer_step
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        with pytest.raises(DataError, match=r"epoch 1: not one readable image in data folder .*12 unreadable.*"
                                            r"checkpoint-0000003.pth' is kept"):
            trainer.run()
    assert [p.name for p in step_checkpoints(tmp_path / "run")] == ["checkpoint-0000003.pth"]


def test_any_unreadable_image_is_skipped_and_counted(photo_dir, tmp_path, monkeypatch, capsys):
    """Pillow raises many types for bad files; an oversized image (over Pillow's pixel limit) raised
    DecompressionBombError, which ended the run."""
    data = tmp_path / "data"
    shutil.copytree(photo_dir, data)
    Image.new("RGB", (300, 300)).save(data / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # 300x300 is over twice the limit; 96x96 is not
    cfg = _cfg(tmp_path / "run", data, **{"data.repeat": 1, "train.batch_size": 7, "train.epochs": 1})
    with pytest.warns(UserWarning, match=r"skipping unreadable image .*huge.png: DecompressionBombError"):
        result = Pretrainer(cfg, "dense", show_progress=False).run()
    assert len(result["history"]) == 1 and result["history"][0]["loss"] is not None
    assert "skipped 1 unreadable image" in capsys.readouterr().out
    # the same rule for labelled image files (finetuning, linear probe) and for tools reading one image
    from mimsparse.train.data import SeededImages, pretrain_transform
    from mimsparse.evaluate.datasets import LabelledImages
    from mimsparse.visualize import load_image

    paths = [data / "huge.png", data / "chelsea.png"]
    labelled = SeededImages(LabelledImages(paths, torch.tensor([0, 1]), ("a", "b")), pretrain_transform(64, 0.5))
    with pytest.warns(UserWarning, match=r"skipping unreadable image .*huge.png: DecompressionBombError"):
        assert labelled[(0, 0)] is None
    assert labelled[(1, 0)][0].shape == (3, 64, 64)
    with pytest.raises(DataError, match=r"cannot read image .*huge.png: DecompressionBombError"):
        load_image(data / "huge.png", (64, 64), 32)


# ---- 5. every fault: one line naming the path; a bug keeps its traceback ------------------------------
def test_disk_full_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(photo_dir, tmp_path, monkeypatch,
                                                                              capsys):
    import mimsparse.train.checkpoint as checkpoint

    real_save, calls = torch.save, []

    def full_disk(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) >= 2:  # step 3 is written (best is a hard link to it); the save at step 6 hits a full disk
            f.write(b"x" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    trainer = Pretrainer(_cfg(tmp_path, photo_dir), "dense", show_progress=False)
    err = _one_line_error(capsys, trainer.run)
    assert err == (f"error: cannot write '{tmp_path / 'checkpoint-0000006.pth'}' (No space left on device); the "
                   f"previous checkpoint '{tmp_path / 'checkpoint-0000003.pth'}' is kept. Free disk space or choose "
                   f"another output path")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".", "checkpoint"))) == \
        [LOCK_NAME, "checkpoint-0000003.pth", "checkpoint-best.pth"]  # no temporary file left
    monkeypatch.undo()
    Pretrainer(_cfg(tmp_path, photo_dir), "dense", resume="auto", show_progress=False)  # still resumable


def test_start_up_needs_room_for_one_checkpoint(photo_dir, tmp_path, monkeypatch):
    import mimsparse.train.checkpoint_manager as cm

    monkeypatch.setattr(cm.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    with pytest.raises(OutputError, match=r"output folder '.*' has 1.0 MiB free but one checkpoint of this run needs "
                                          r"about \d+\.\d MiB; free disk space or choose another folder"):
        Pretrainer(_cfg(tmp_path, photo_dir), "dense", show_progress=False)


def test_output_paths_that_cannot_be_written(photo_dir, tmp_path, capsys):
    result = _run(tmp_path, photo_dir, **{"train.max_steps": 1})
    ckpt = str(result["checkpoint"])
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "a_file").write_text("x")
    to_dense, official = _tool("convert_to_dense"), _tool("convert_official")
    cases = [
        (lambda: to_dense.main([ckpt, "-o", str(tmp_path / "a_folder"), "--no-verify"]),
         f"error: cannot write '{tmp_path / 'a_folder'}' (a folder of that name is in the way); nothing was written."),
        (lambda: official.main(["export", ckpt, "-o", str(tmp_path / "a_folder")]),
         f"error: cannot write '{tmp_path / 'a_folder'}' (a folder of that name is in the way)"),
        (lambda: official.main(["export", ckpt, "--dense", "-o", str(tmp_path / "a_file" / "sub" / "dense.pth")]),
         f"error: cannot write '{tmp_path / 'a_file' / 'sub' / 'dense.pth'}' (Not a directory); nothing was written"),
    ]
    for main, expected in cases:
        assert _one_line_error(capsys, main).startswith(expected)
    # the training log in the way
    log = RunLog(tmp_path / "a_folder")
    with pytest.raises(OutputError, match=r"cannot write the training log '.*a_folder' \(Is a directory\); the "
                                          r"checkpoints in .* are kept"):
        log.write({"step": 1})


def test_unreadable_user_files_are_one_line(photo_dir, tmp_path, capsys):
    from tests.test_official import DEC_DEPTH, DEC_DIM, NAME, official_fcmae_layout, random_state

    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "bad.yaml").write_text("train:\n  epochs: [3\nmodel: x\n")
    torch.save(random_state(official_fcmae_layout(NAME, DEC_DIM, DEC_DEPTH)), tmp_path / "official_sd.pth")
    to_dense, official, pretrain = _tool("convert_to_dense"), _tool("convert_official"), _tool("pretrain")
    empty = str(tmp_path / "empty.pth")
    cases = [
        (lambda: to_dense.main([empty]),
         f"error: checkpoint '{empty}' is empty (0 bytes); use an earlier checkpoint from the same folder"),
        (lambda: official.main(["export", empty, "-o", str(tmp_path / "x.pth")]),
         f"error: checkpoint '{empty}' is empty"),
        (lambda: official.main(["import", empty, "--output-dir", str(tmp_path / "imp")]),
         f"error: checkpoint '{empty}' is empty"),
        (lambda: pretrain.main(["--resume", empty, "--data", str(photo_dir), *tiny_overrides(tmp_path / "r")]),
         f"error: checkpoint '{empty}' is empty"),
        (lambda: pretrain.main(["--config", str(tmp_path / "bad.yaml")]),
         f"error: config file '{tmp_path / 'bad.yaml'}' is not valid YAML at line 3, column 6: expected ',' or ']', "
         f"but got ':'; see configs/ for examples"),
        (lambda: pretrain.main(["--config", str(tmp_path)]), f"error: config file '{tmp_path}' is a folder; pass a YAML"),
        (lambda: to_dense.main([str(tmp_path)]), f"error: checkpoint '{tmp_path}' is a folder; pass a .pth file in it"),
        (lambda: official.main(["export", str(tmp_path / "official_sd.pth"), "-o", str(tmp_path / "y.pth")]),
         f"error: '{tmp_path / 'official_sd.pth'}' is not a mimsparse pretraining checkpoint (no 'model', 'config'); "
         f"it looks like a bare state dict"),
    ]
    for main, expected in cases:
        assert _one_line_error(capsys, main).startswith(expected)


def test_run_cli_keeps_tracebacks_for_bugs(capsys):
    def bug():
        return {}["missing"]

    with pytest.raises(KeyError):
        run_cli(bug)
    with pytest.raises(ValueError):
        run_cli(lambda: int("x"))  # a plain ValueError is a bug, not user input
    with pytest.raises(TypeError):
        run_cli(lambda: len(3))
    assert issubclass(ConfigError, (MimsparseError, ValueError)) and issubclass(OutputError, OSError)

    def os_error():
        raise PermissionError(errno.EACCES, "Permission denied", "/some/file.png")

    assert run_cli(os_error) == 2
    assert capsys.readouterr().err == "error: '/some/file.png': Permission denied\n"


@pytest.mark.slow
def test_tools_report_faults_in_one_line(photo_dir, tmp_path):
    """The same through real processes, as a user runs the tools."""
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "bad.yaml").write_text("optim: {base_lr: [}\n")
    for script, args, expected in [
        ("convert_to_dense.py", [str(tmp_path / "empty.pth")], "is empty (0 bytes)"),
        ("pretrain.py", ["--config", str(tmp_path / "bad.yaml")], "is not valid YAML at line 1"),
    ]:
        proc = run_tool(script, *args, check=False)
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and expected in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


# ---- 6. smaller defects ----------------------------------------------------------------------------
def test_overrides_anywhere_among_the_options():
    parser = _tool("pretrain").get_args_parser()
    args = parse_with_overrides(parser, ["train.epochs=3", "--backend", "dense", "model.name=convnextv2_femto",
                                         "--img", "64", "optim.base_lr=1e-3", "--no-progress", "train.epochs=4"])
    assert args.backend == "dense" and args.img_size == "64" and args.no_progress
    assert args.overrides == ["train.epochs=3", "model.name=convnextv2_femto", "optim.base_lr=1e-3", "train.epochs=4"]
    cfg = load_config(None, args.overrides)
    assert cfg.train.epochs == 4 and cfg.model.name == "convnextv2_femto" and cfg.optim.base_lr == 1e-3
    with pytest.raises(SystemExit):
        parse_with_overrides(parser, ["train.epochs=3", "--unknown-option"])
    with pytest.raises(SystemExit):
        parse_with_overrides(parser, ["--backend", "dense", "stray"])


@pytest.mark.parametrize("overrides", [["train.epochs=3", "train=5"], ["train=5", "train.epochs=3"],
                                       ["optim=1e-3"], ["model={}"]])
def test_a_section_given_as_a_value_is_refused_by_name(overrides, tmp_path):
    section = next(o for o in overrides if "." not in o.split("=")[0]).split("=")[0]
    with pytest.raises(ConfigError, match=rf"override '{section}=.*': '{section}' is a section, not a value; set one "
                                          rf"of its keys \({section}\."):
        load_config(None, overrides)
    (tmp_path / "c.yaml").write_text("train: 5\n")
    with pytest.raises(ConfigError, match="config key 'train' is a section; give it a mapping, got 5"):
        load_config(tmp_path / "c.yaml")


def test_log_has_one_valid_record_per_step_across_resumes(photo_dir, tmp_path):
    run = tmp_path / "run"
    _run(tmp_path, photo_dir, **{"train.keep_last": 0})  # logs steps 1..6, checkpoints at 3 and 6
    # a kill after step 5 was logged but before the checkpoint at 6, with a torn last line
    (run / "checkpoint-0000006.pth").unlink()
    lines = (run / "log.jsonl").read_text().splitlines()[:5]
    (run / "log.jsonl").write_text("\n".join(lines) + '\n{"step": 6, "lo')
    Pretrainer(_cfg(run, photo_dir), "dense", resume="auto", show_progress=False).run()
    Pretrainer(_cfg(run, photo_dir), "dense", resume="auto", show_progress=False).run()  # nothing left to do
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]

    # non-finite numbers are written as null: strict JSON parsers accept every line
    log = RunLog(tmp_path / "nan.jsonl")
    log.write({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "extra": [float("-inf"), 1.0]})

    def refuse(name):
        raise ValueError(name)

    text = (tmp_path / "nan.jsonl").read_text()
    assert json.loads(text, parse_constant=refuse) == {"step": 1, "loss": None, "grad_norm": None, "extra": [None, 1.0]}


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield 0o644
    os.umask(old)


def test_output_files_get_the_umasks_normal_mode(photo_dir, tmp_path, umask_022, capsys):
    result = _run(tmp_path, photo_dir, **{"train.max_steps": 1})
    run = tmp_path / "run"
    official, to_dense = _tool("convert_official"), _tool("convert_to_dense")
    assert official.main(["export", str(result["checkpoint"]), "-o", str(tmp_path / "fcmae.pth")]) == 0
    assert to_dense.main([str(result["checkpoint"]), "-o", str(tmp_path / "dense.pth"), "--no-verify"]) == 0
    files = [result["checkpoint"], run / "checkpoint-best.pth", run / RUN_FILE, run / "log.jsonl",
             tmp_path / "fcmae.pth", tmp_path / "dense.pth"]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(umask_022) for p in files}
    os.umask(0o027)  # a stricter umask is respected too
    save_checkpoint({"a": torch.ones(1)}, tmp_path / "strict.pth")
    assert (tmp_path / "strict.pth").stat().st_mode & 0o777 == 0o640


def test_official_import_says_which_value_won(photo_dir, tmp_path, capsys):
    from mimsparse.convert.official import import_config
    from tests.test_official import DEC_DEPTH, DEC_DIM, NAME, official_fcmae_layout, random_state

    found = {"model": {"name": NAME, "decoder_dim": 32, "norm_pix_loss": True}, "mask": {"ratio": 0.6}}
    merged, notes = import_config({"model": {"decoder_dim": 64}, "mask": {"ratio": 0.75}, "train": {"epochs": 2}},
                                  found)
    assert merged["model"]["decoder_dim"] == 32 and merged["mask"]["ratio"] == 0.75 and merged["train"]["epochs"] == 2
    assert merged["model"]["norm_pix_loss"] is True
    assert notes == ["model.decoder_dim=32 from the checkpoint's shapes (your 64 was not used: the weights only "
                     "fit 32)",
                     "model.norm_pix_loss=True from the checkpoint's args",
                     "mask.ratio=0.75 from your config/command line (the checkpoint's args say 0.6)"]

    torch.save({"model": random_state(official_fcmae_layout(NAME, DEC_DIM, DEC_DEPTH), seed=3),
                "args": argparse.Namespace(mask_ratio=0.6, norm_pix_loss=True)}, tmp_path / "official.pth")
    run = tmp_path / "run"
    tool = _tool("convert_official")
    assert tool.main(["import", str(tmp_path / "official.pth"), "--output-dir", str(run), "--data", str(photo_dir),
                      *tiny_overrides(run), "mask.ratio=0.75"]) == 0
    out = capsys.readouterr().out
    assert "mask.ratio=0.75 from your config/command line (the checkpoint's args say 0.6)" in out
    assert "model.decoder_dim=32 from the checkpoint's shapes (your 64 was not used" in out
    assert load_config(run / "config.yaml").mask.ratio == 0.75


def test_exports_print_their_exact_load_line(photo_dir, tmp_path, capsys):
    import timm

    result = _run(tmp_path, photo_dir, **{"train.max_steps": 1})
    ckpt = str(result["checkpoint"])
    to_dense, official = _tool("convert_to_dense"), _tool("convert_official")
    capsys.readouterr()
    assert to_dense.main([ckpt, "-o", str(tmp_path / "timm.pth"), "--num-classes", "5", "--no-verify"]) == 0
    line = capsys.readouterr().out.split("load with: ")[1].splitlines()[0]
    assert line == (f"timm.create_model('convnextv2_atto', num_classes=5).load_state_dict(torch.load("
                    f"'{tmp_path / 'timm.pth'}', weights_only=True))")
    result = eval(line, {"timm": timm, "torch": torch})  # the printed line itself loads the file (strict)
    assert not result.missing_keys and not result.unexpected_keys

    assert official.main(["export", ckpt, "-o", str(tmp_path / "dense.pth"), "--dense", "--num-classes", "5"]) == 0
    out = capsys.readouterr().out
    assert "under the key 'model'" in out
    assert (f"load with: from models.convnextv2 import convnextv2_atto; model = convnextv2_atto(num_classes=5); "
            f"model.load_state_dict(torch.load('{tmp_path / 'dense.pth'}', weights_only=True)['model'])") in out
    assert set(torch.load(tmp_path / "dense.pth", weights_only=True)) == {"model"}
    assert official.main(["export", ckpt, "-o", str(tmp_path / "fcmae.pth")]) == 0
    assert (f"load with: from models.fcmae import convnextv2_atto; model = convnextv2_atto(decoder_depth=1, "
            f"decoder_embed_dim=64, norm_pix_loss=True); model.load_state_dict(torch.load('{tmp_path / 'fcmae.pth'}', "
            f"weights_only=True)['model'])") in capsys.readouterr().out
