"""Checkpoints written before the package was reorganised (commit 46518c8: flat mimsparse/, no run.json,
no recorded digest) still resume and convert. The test writes a run folder exactly as that code did."""
import json

import timm
import torch

from mimsparse.train.checkpoint import load_checkpoint
from tests.conftest import run_tool, tiny_overrides

# The checkpoint keys and config sections the old code wrote (run_checkpoints.RunCheckpoints.checkpoint_state).
OLD_KEYS = ("model", "optimizer", "scheduler", "scaler", "run", "config", "backend", "versions", "rng")
OLD_TRAIN_KEYS = ("epochs", "batch_size", "seed", "output_dir", "tensorboard", "vis_every", "log_every",
                  "save_every_epochs", "max_steps", "keep_last", "amp", "clip_grad", "accum_steps",
                  "skip_nonfinite")


def _as_old_run_folder(ckpt_path, folder):
    """Rewrite a checkpoint of today's code into the old layout, alone in ``folder``."""
    ckpt = load_checkpoint(ckpt_path)
    old = {k: ckpt[k] for k in OLD_KEYS}
    old["config"] = dict(ckpt["config"])
    old["config"]["train"] = {k: v for k, v in ckpt["config"]["train"].items() if k in OLD_TRAIN_KEYS}
    old["config"]["train"]["output_dir"] = str(folder)
    old["run"] = {k: ckpt["run"][k] for k in ("epoch", "step", "batch_in_epoch", "best_loss", "skipped_steps")}
    folder.mkdir(parents=True)
    path = folder / f"checkpoint-{old['run']['step']:07d}.pth"
    torch.save(old, path)  # the old code's format: a plain torch.save of this dict (written via a temp file)
    return path, old


def test_checkpoint_of_the_old_layout_resumes_and_converts(photo_dir, tmp_path):
    first = tmp_path / "today"
    run_tool("pretrain.py", "--backend", "dense", "--data", str(photo_dir), "--no-progress",
             *tiny_overrides(first, **{"train.max_steps": 2}))
    old_dir = tmp_path / "old"
    path, old = _as_old_run_folder(first / "checkpoint-0000002.pth", old_dir)
    assert not (old_dir / "run.json").exists() and old["run"]["step"] == 2

    # resume: --resume auto finds it, continues at step 3, and the first new step trains from its weights
    run_tool("pretrain.py", "--backend", "packed", "--data", str(photo_dir), "--resume", "auto", "--no-progress",
             *tiny_overrides(old_dir, **{"train.max_steps": 4}))
    steps = [json.loads(line)["step"] for line in (old_dir / "log.jsonl").read_text().splitlines()]
    assert steps == [3, 4]
    resumed = load_checkpoint(old_dir / "checkpoint-0000004.pth")
    assert resumed["run"]["step"] == 4

    # convert: the old checkpoint itself converts and loads into timm with strict=True
    out = tmp_path / "old-timm.pth"
    run_tool("convert_to_dense.py", str(path), "-o", str(out), "--num-classes", "3")
    model = timm.create_model(old["config"]["model"]["name"], num_classes=3)
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
