"""Pretraining engine under bad input and failures: sizes, mask ratios, image modes, unwritable
output, SIGKILL during a save, non-finite losses, precision, accumulation, clipping, data workers."""
import os
import signal
import struct
import subprocess
import sys
import threading
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from mimsparse.backends import BackendUnavailable, get_backend
from mimsparse.models.build import build_fcmae
from mimsparse.train.checkpoint import CheckpointError, load_checkpoint
from mimsparse.config import ConfigError, config_from_dict, load_config
from mimsparse.train.data import FileSource, SeededImages, list_images, pretrain_transform, to_rgb
from mimsparse.errors import TrainingError
from mimsparse.train.build import Pretrainer
from mimsparse.train.precision import check_amp
from tests.conftest import ROOT, run_tool, tiny_overrides


def _cfg(out_dir, data_dir, **extra):
    return load_config(None, tiny_overrides(out_dir, **{"data.path": str(data_dir), **extra}))


def _params(model_or_state):
    sd = model_or_state if isinstance(model_or_state, dict) else model_or_state.state_dict()
    return {k: v.detach().clone() for k, v in sd.items()}


def _nan_loss_at(model, calls):
    """Make the model's loss NaN on the given forward calls (1-based)."""
    original, seen = model.forward_loss, []

    def forward_loss(*args, **kwargs):
        seen.append(1)
        loss = original(*args, **kwargs)
        return loss * float("nan") if len(seen) in calls else loss

    model.forward_loss = forward_loss


# ---- sizes and mask ratios ------------------------------------------------------------------------
def test_image_size_must_be_a_multiple_of_32(photo_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"data.img_size=200: image size 200x200 is not divisible by the patch "
                                          r"size 32.*--img-size 192"):
        Pretrainer(_cfg(tmp_path, photo_dir, **{"data.img_size": 200}), "dense", show_progress=False)


def test_non_square_sources_and_inputs(photo_dir, tmp_path):
    # Source images of any aspect ratio: RandomResizedCrop makes square data.img_size crops.
    data = tmp_path / "data"
    data.mkdir()
    with Image.open(photo_dir / "chelsea.png") as img:
        img.resize((150, 64)).save(data / "wide.png")
        img.resize((40, 130)).save(data / "tall_and_small.png")
    cfg = _cfg(tmp_path / "run", data, **{"train.batch_size": 2, "train.epochs": 1})
    result = Pretrainer(cfg, "dense", show_progress=False).run()
    assert len(result["history"]) == 2 and all(np.isfinite(r["loss"]) for r in result["history"])
    # The model itself takes any H x W that are multiples of 32 (non-square grids included) ...
    model = build_fcmae(cfg)
    images = torch.randn(2, 3, 64, 96)
    loss, pred, visible = model(images, generator=torch.Generator().manual_seed(0))
    assert visible.shape == (2, 2, 3) and pred.shape == (2, 6, 32 * 32 * 3) and torch.isfinite(loss)
    # ... and names the rule otherwise.
    with pytest.raises(ValueError, match="image size 64x100 is not divisible by the patch size 32"):
        model(torch.randn(1, 3, 64, 100))


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.0, 1.5])
def test_mask_ratio_out_of_range_is_refused(photo_dir, tmp_path, ratio):
    with pytest.raises(ConfigError, match=rf"mask.ratio must be in \(0, 1\).*got {ratio}"):
        Pretrainer(_cfg(tmp_path, photo_dir, **{"mask.ratio": ratio}), "dense", show_progress=False)


def test_mask_ratio_must_be_a_number():
    with pytest.raises(ConfigError, match="'mask.ratio' must be float, got str 'abc'"):
        load_config(None, ["mask.ratio=abc"])
    with pytest.raises(ConfigError, match="'mask.ratio' must be a number, got True"):
        config_from_dict({"mask": {"ratio": True}})


def _with_sample_fully_masked(trainer):
    original = trainer.make_mask

    def make_mask(images, seeds, progress):
        visible = original(images, seeds, progress)
        visible[0] = False
        return visible

    trainer.make_mask = make_mask


def test_sample_with_every_patch_masked(photo_dir, tmp_path):
    """A sample with no visible patch has no sparse site: GRN and the loss stay finite, and its
    reconstruction (from mask tokens alone) still counts in the loss."""
    trainer = Pretrainer(_cfg(tmp_path, photo_dir, **{"train.max_steps": 2}), "dense", show_progress=False)
    _with_sample_fully_masked(trainer)
    result = trainer.run()
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in result["history"])
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())

    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64)
    visible = torch.ones(2, 2, 2, dtype=torch.bool)
    visible[0] = False          # sample 0: every patch hidden
    visible[1, 0, 0] = False    # sample 1: one patch hidden
    losses = {}
    for name in ("dense", "packed"):
        try:
            backend = get_backend(name)
        except BackendUnavailable:
            continue
        torch.manual_seed(0)
        model = build_fcmae(trainer.cfg, backend)
        loss, _, _ = model(images, visible)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        losses[name] = loss.item()
    assert losses["dense"] == pytest.approx(losses.get("packed", losses["dense"]), rel=1e-4)


# ---- image modes ------------------------------------------------------------------------------------
def _png16(arr: np.ndarray, path) -> None:
    """Write a 16-bit-per-channel RGB(A) PNG (Pillow cannot write those)."""
    h, w, c = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, {3: 2, 4: 6}[c], 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def test_to_rgb_converts_every_mode_of_a_real_photo(photo_dir, tmp_path):
    with Image.open(photo_dir / "chelsea.png") as img:
        rgb = np.asarray(img.convert("RGB").resize((48, 32)))
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    alpha = np.full(gray.shape, 255, np.uint8)
    alpha[:, :16] = 0  # left third transparent
    files = {}
    Image.fromarray(gray).save(files.setdefault("L", tmp_path / "gray.png"))
    Image.fromarray(np.dstack([gray, alpha])).save(files.setdefault("LA", tmp_path / "gray_alpha.png"))
    Image.fromarray(np.dstack([rgb, alpha])).save(files.setdefault("RGBA", tmp_path / "rgba.png"))
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE).save(files.setdefault("P", tmp_path / "palette.png"))
    Image.fromarray(gray > 128).save(files.setdefault("1", tmp_path / "bilevel.png"))
    Image.fromarray(rgb).convert("CMYK").save(files.setdefault("CMYK", tmp_path / "cmyk.jpg"), quality=95)
    Image.fromarray(gray.astype(np.uint16) * 257).save(files.setdefault("I;16", tmp_path / "gray16.png"))
    Image.fromarray(gray.astype(np.float32) / 255.0).save(files.setdefault("F", tmp_path / "float.tif"))
    _png16(rgb.astype(np.uint16) * 257, files.setdefault("RGB;16", tmp_path / "rgb16.png"))
    _png16(np.dstack([rgb, alpha]).astype(np.uint16) * 257, files.setdefault("RGBA;16", tmp_path / "rgba16.png"))

    out = {}
    for mode, path in files.items():
        with Image.open(path) as img:
            img.load()
            if mode in ("L", "LA", "RGBA", "P", "1", "CMYK", "I;16", "F"):
                assert img.mode == mode, (path, img.mode)
            converted = to_rgb(img)
        assert converted.mode == "RGB" and converted.size == (48, 32), mode
        out[mode] = np.asarray(converted).astype(int)

    as_gray = np.repeat(gray[..., None], 3, axis=2)
    assert np.array_equal(out["L"], as_gray)
    assert np.array_equal(out["I;16"], as_gray)          # 16-bit keeps its appearance (value / 257)
    assert np.abs(out["F"] - as_gray).max() <= 1          # float in [0, 1] -> x 255
    assert np.array_equal(out["RGB;16"], rgb)
    visible = np.s_[:, 16:]
    for mode, expected in (("LA", as_gray), ("RGBA", rgb), ("RGBA;16", rgb)):
        assert np.array_equal(out[mode][visible], expected[visible]), mode
        assert out[mode][:, :16].max() == 0, mode        # transparent -> black
    assert np.abs(out["P"] - rgb).mean() < 8             # adaptive palette: small quantisation error
    assert np.abs(out["CMYK"] - rgb).mean() < 8          # JPEG error
    assert set(np.unique(out["1"])) <= {0, 255}

    # The training dataset reads all of them as 3-channel crops.
    paths = list_images(tmp_path)
    dataset = SeededImages(FileSource(paths), pretrain_transform(64, 0.5))
    for i in range(len(paths)):
        image, seed = dataset[(i, i)]
        assert image.shape == (3, 64, 64) and torch.isfinite(image).all() and seed == i


# ---- output folder --------------------------------------------------------------------------------
def test_output_folder_below_a_regular_file_is_refused(photo_dir, tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")  # fails for root too, unlike a chmod
    with pytest.raises(CheckpointError, match=r"output folder .*not_a_folder/run' is not writable \(Not a directory\)"):
        Pretrainer(_cfg(blocker / "run", photo_dir), "dense", show_progress=False)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_refused(photo_dir, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(CheckpointError, match="is not writable .*Permission denied"):
            Pretrainer(_cfg(folder, photo_dir), "dense", show_progress=False)
    finally:
        folder.chmod(0o700)


@pytest.mark.slow
def test_cli_bad_input_is_one_line(photo_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases = [(["--img", "200"], "error: data.img_size=200: image size 200x200 is not divisible by the patch size 32"),
             (["--output-dir", str(blocker / "run")], "error: output folder")]
    for args, expected in cases:
        proc = run_tool("pretrain.py", "--data", str(photo_dir), *tiny_overrides(tmp_path / "run"), *args, check=False)
        assert proc.returncode == 2 and proc.stderr.startswith(expected), proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ---- SIGKILL during a save ----------------------------------------------------------------------------
# Runs tools/pretrain.py with torch.save replaced: from the PAUSE_AT-th call on, it writes half of
# the checkpoint's bytes to the (temporary) file, says so, and waits to be killed.
_PAUSING_DRIVER = r"""
import io, os, runpy, sys, time
import torch

real_save, calls = torch.save, []

def pausing_save(obj, f, *args, **kwargs):
    calls.append(1)
    if len(calls) < int(os.environ["PAUSE_AT"]):
        return real_save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    os.fsync(f.fileno())
    print("PAUSED-IN-SAVE", getattr(f, "name", ""), flush=True)
    time.sleep(600)

torch.save = pausing_save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_sigkill_during_save_keeps_the_previous_checkpoint(photo_dir, tmp_path):
    run_dir = tmp_path / "killed"
    overrides = tiny_overrides(run_dir, **{"data.path": str(photo_dir)})
    # epoch 0 ends at step 3: save 1 (checkpoint-0000003; best is a hard link to it); epoch 1 ends at step 6: save 2
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PAUSE_AT="2")
    proc = subprocess.Popen([sys.executable, "-c", _PAUSING_DRIVER, str(ROOT / "tools" / "pretrain.py"),
                             "--no-progress", *overrides], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)
    watchdog = threading.Timer(180, proc.kill)
    watchdog.start()
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("PAUSED-IN-SAVE"):
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.wait()
    finally:
        watchdog.cancel()
    assert proc.returncode == -signal.SIGKILL, "".join(lines) + proc.stderr.read()
    torn = list(run_dir.glob(".checkpoint-0000006.pth.*.tmp"))
    assert len(torn) == 1 and torn[0].stat().st_size > 0  # killed halfway through writing step 6
    assert sorted(p.name for p in run_dir.glob("checkpoint-*.pth")) == ["checkpoint-0000003.pth", "checkpoint-best.pth"]
    assert load_checkpoint(run_dir / "checkpoint-0000003.pth")["run"]["step"] == 3

    cfg = _cfg(run_dir, photo_dir)
    resumed = Pretrainer(cfg, "dense", resume="auto", show_progress=False)
    assert resumed.resumed_from.name == "checkpoint-0000003.pth"
    rest = resumed.run()
    full = Pretrainer(_cfg(tmp_path / "full", photo_dir), "dense", show_progress=False).run()
    assert [r["loss"] for r in rest["history"]] == [r["loss"] for r in full["history"]][3:]
    assert not list(run_dir.glob("*.tmp")) and (run_dir / "checkpoint-0000006.pth").is_file()


# ---- non-finite losses ---------------------------------------------------------------------------------
def test_nonfinite_loss_stops_training_and_keeps_the_last_good_checkpoint(photo_dir, tmp_path):
    trainer = Pretrainer(_cfg(tmp_path, photo_dir), "dense", show_progress=False)
    _nan_loss_at(trainer.model, {5})  # 3 steps per epoch: checkpoint-0000003 exists, step 5 fails
    with pytest.raises(TrainingError, match=r"non-finite loss nan .*at step 5 \(epoch 1\).*checkpoint-0000003.pth"
                                            r"' is kept.*train.skip_nonfinite"):
        trainer.run()
    kept = sorted(p.name for p in tmp_path.glob("checkpoint-*.pth"))
    assert kept == ["checkpoint-0000003.pth", "checkpoint-best.pth"]
    ckpt = load_checkpoint(tmp_path / "checkpoint-0000003.pth")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    Pretrainer(_cfg(tmp_path, photo_dir), "dense", resume="auto", show_progress=False)  # resumable


def test_skip_nonfinite_skips_the_update(photo_dir, tmp_path):
    one_step = Pretrainer(_cfg(tmp_path / "a", photo_dir, **{"train.max_steps": 1}), "dense", show_progress=False)
    one_step.run()
    skipping = Pretrainer(_cfg(tmp_path / "b", photo_dir, **{"train.max_steps": 2, "train.skip_nonfinite": 1}),
                          "dense", show_progress=False)
    _nan_loss_at(skipping.model, {2})
    history = skipping.run()["history"]
    assert history[1]["loss"] is None and history[1]["skipped"].startswith("non-finite loss nan (skip 1 of 1)")
    assert skipping.state.skipped_steps == 1 and skipping.state.step == 2
    after, before = _params(skipping.model), _params(one_step.model)
    assert all(torch.equal(after[k], before[k]) for k in before)  # the bad step changed no weight
    assert '"loss": null' in (tmp_path / "b" / "log.jsonl").read_text().splitlines()[1]

    over = Pretrainer(_cfg(tmp_path / "c", photo_dir, **{"train.skip_nonfinite": 1}), "dense", show_progress=False)
    _nan_loss_at(over.model, {2, 3})
    with pytest.raises(TrainingError, match=r"at step 3 .*1 non-finite step\(s\) were already skipped"):
        over.run()


# ---- precision ------------------------------------------------------------------------------------------
def test_mixed_precision_is_refused_where_it_cannot_run(photo_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"train.amp=fp16 is for CUDA \(it needs loss scaling .*\); on cpu use "
                                          r"train.amp=bf16 or train.amp=none"):
        Pretrainer(_cfg(tmp_path, photo_dir, **{"train.amp": "fp16"}), "dense", show_progress=False)
    for name in ("spconv", "minkowski"):  # no bf16 kernels in either library
        try:
            backend = get_backend(name)
        except BackendUnavailable:
            continue
        with pytest.raises(TypeError, match=f"the {name} backend does not support bfloat16 on cpu"):
            check_amp("bf16", backend, torch.device("cpu"))
    assert check_amp("bf16", get_backend("packed"), torch.device("cpu")) is torch.bfloat16
    with pytest.raises(ConfigError, match="train.amp must be one of none, bf16, fp16, got 'fp8'"):
        check_amp("fp8", get_backend("dense"), torch.device("cpu"))

    class NoBF16(type(get_backend("dense"))):
        name = "nobf16"

        def supported_dtypes(self, device):
            return (torch.float32, torch.float16)

    cuda = torch.device("cuda")  # only checked, never used: no GPU needed
    with pytest.raises(TypeError, match="nobf16 backend does not support bfloat16 on cuda; supported: float32, float16"):
        check_amp("bf16", NoBF16(), cuda)
    assert check_amp("fp16", NoBF16(), cuda) is torch.float16 and check_amp("none", NoBF16(), cuda) is None


def test_fp16_loss_scaling_path(photo_dir, tmp_path):
    """The GradScaler code path that train.amp=fp16 selects on CUDA, run on CPU (autocast runs fp16 there
    too) by swapping in a CPU scaler: overflowing steps change no weight and lower the scale; then
    steps apply, the scale is checkpointed and restored on resume."""
    def trainer(name, init_scale, steps):
        t = Pretrainer(_cfg(tmp_path / name, photo_dir, **{"train.max_steps": steps, "train.clip_grad": 1.0}), "dense",
                       show_progress=False)
        t.amp_dtype, t.scaler = torch.float16, torch.amp.GradScaler("cpu", init_scale=init_scale)
        return t

    overflow = trainer("overflow", 2.0**40, 2)
    before = _params(overflow.model)
    history = overflow.run()["history"]
    assert [r["skipped"] for r in history] == [f"fp16 gradient overflow; loss scale lowered to {2.0**39:g}",
                                               f"fp16 gradient overflow; loss scale lowered to {2.0**38:g}"]
    assert all(torch.equal(v, before[k]) for k, v in _params(overflow.model).items())

    scaled = trainer("scaled", 2.0**8, 2)
    result = scaled.run()
    assert all("skipped" not in r and np.isfinite(r["loss"]) for r in result["history"])
    assert not all(torch.equal(v, before[k]) for k, v in _params(scaled.model).items())
    assert load_checkpoint(result["checkpoint"])["scaler"]["scale"] == 2.0**8
    resumed = trainer("scaled", 1.0, 3)
    resumed.load(result["checkpoint"])
    assert resumed.scaler.get_scale() == 2.0**8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cuda(photo_dir, tmp_path, amp):
    trainer = Pretrainer(_cfg(tmp_path, photo_dir, **{"train.amp": amp, "train.max_steps": 3}), "dense", "cuda",
                         show_progress=False)
    assert trainer.scaler.is_enabled() == (amp == "fp16")
    result = trainer.run()
    assert all(np.isfinite(r["loss"]) for r in result["history"])
    assert ("scale" in load_checkpoint(result["checkpoint"])["scaler"]) == (amp == "fp16")


# ---- accumulation and clipping -----------------------------------------------------------------------------
def test_accumulation_matches_a_larger_batch(photo_dir, tmp_path):
    big = _cfg(tmp_path / "big", photo_dir, **{"train.batch_size": 4, "train.max_steps": 2})
    accum = _cfg(tmp_path / "acc", photo_dir, **{"train.batch_size": 2, "train.accum_steps": 2, "train.max_steps": 2})
    assert big.lr() == accum.lr() == pytest.approx(1e-2 * 4 / 256)
    a, b = (Pretrainer(c, "dense", show_progress=False) for c in (big, accum))
    ha, hb = a.run()["history"], b.run()["history"]
    assert [r["loss"] for r in ha] == pytest.approx([r["loss"] for r in hb], rel=1e-5)
    pa, pb = _params(a.model), _params(b.model)
    assert max((pa[k] - pb[k]).abs().max().item() for k in pa) < 1e-6


def test_clipping_bounds_the_gradient_norm(photo_dir, tmp_path):
    trainer = Pretrainer(_cfg(tmp_path, photo_dir, **{"train.clip_grad": 0.01, "train.max_steps": 2}), "dense",
                         show_progress=False)
    seen = []
    trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(
        torch.nn.utils.get_total_norm([p.grad for p in trainer.model.parameters() if p.grad is not None]).item()))
    history = trainer.run()["history"]
    assert len(seen) == 2 and max(seen) <= 0.01 * (1 + 1e-4)
    assert min(r["grad_norm"] for r in history) > 0.01  # the logged norm is before clipping: it was active


# ---- data loading ---------------------------------------------------------------------------------------------
def test_worker_processes_give_the_same_batches(photo_dir, tmp_path):
    loaders = {}
    for workers in (0, 2):
        trainer = Pretrainer(_cfg(tmp_path / str(workers), photo_dir, **{"data.num_workers": workers}), "dense",
                             show_progress=False)
        loaders[workers] = [list(trainer.loader(1, 0)), list(trainer.loader(0, 1))]  # mid-epoch start too
    for serial, parallel in zip(loaders[0], loaders[2]):
        assert len(serial) == len(parallel) > 0
        for (img0, seeds0, bad0), (img2, seeds2, bad2) in zip(serial, parallel):
            assert torch.equal(img0, img2) and torch.equal(seeds0, seeds2) and bad0 == bad2 == 0


def test_tensorboard_is_optional(photo_dir, tmp_path, monkeypatch):
    import mimsparse.train.logger as logger

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    assert logger.tensorboard_writer(tmp_path / "tb") is None
    scalars = []

    class FakeWriter:
        def add_scalar(self, tag, value, step):
            scalars.append((tag, step))

        def close(self):
            scalars.append("closed")

    monkeypatch.setattr(logger, "tensorboard_writer", lambda folder: FakeWriter())
    Pretrainer(_cfg(tmp_path, photo_dir, **{"train.max_steps": 1}), "dense", show_progress=False).run()
    assert ("train/loss", 1) in scalars and ("train/lr", 1) in scalars and scalars[-1] == "closed"


def test_progress_bar_and_log_show_loss_lr_and_speed(photo_dir, tmp_path, capsys):
    import json

    Pretrainer(_cfg(tmp_path, photo_dir, **{"train.max_steps": 2}), "dense", show_progress=True).run()
    bar = capsys.readouterr().err
    assert "epoch 0" in bar and "loss=" in bar and "lr=" in bar and "img_s=" in bar
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert all({"loss", "lr", "grad_norm", "images_per_s", "epoch"} <= r.keys() and r["images_per_s"] > 0 for r in log)


def test_resuming_a_finished_run_says_there_is_nothing_to_do(photo_dir, tmp_path):
    overrides = tiny_overrides(tmp_path / "run", **{"train.epochs": 1, "data.repeat": 1})  # 6 photos, batch 4: 1 step
    run_tool("pretrain.py", "--data", str(photo_dir), "--no-progress", *overrides)
    proc = run_tool("pretrain.py", "--data", str(photo_dir), "--no-progress", "--resume", "auto", *overrides)
    assert "nothing to do: the run already did its 1 steps (raise --epochs to go on)" in proc.stdout
    assert str(tmp_path / "run" / "checkpoint-0000001.pth") in proc.stdout
