"""What a run folder tells about its run: the resolved config and command, a best checkpoint that costs no
second copy, optional Weights & Biases logging."""
import os
import sys
import types

import torch

from mimsparse.config import load_config
from mimsparse.train.checkpoint import load_checkpoint
from mimsparse.train.checkpoint_manager import BEST_NAME, CheckpointManager, step_name
from mimsparse.train.build import Pretrainer
from tests.conftest import tiny_overrides


def _cfg(out_dir, data_dir, **extra):
    return load_config(None, tiny_overrides(out_dir, **{"data.path": str(data_dir), "train.tensorboard": False,
                                                        **extra}))


def test_run_folder_gets_the_resolved_config_and_the_command(photo_dir, tmp_path):
    cfg = _cfg(tmp_path, photo_dir, **{"train.max_steps": 1, "optim.base_lr": 3e-3})
    Pretrainer(cfg, "dense", show_progress=False).run()
    text = (tmp_path / "config.yaml").read_text()
    assert text.startswith("# mimsparse run started: ")
    assert load_config(tmp_path / "config.yaml").to_dict() == cfg.to_dict()  # readable back with --config

    resumed = _cfg(tmp_path, photo_dir, **{"train.max_steps": 2, "optim.base_lr": 3e-3})
    Pretrainer(resumed, "dense", resume="auto", show_progress=False).run()
    assert (tmp_path / "config.yaml").read_text().startswith("# mimsparse run resumed at step 1: ")


def test_best_checkpoint_is_a_link_to_its_step_checkpoint_and_outlives_rotation(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.claim(resuming=False, say=lambda *a: None)
    state = {"model": {"w": torch.arange(6.0)}}
    manager.save(state, 1, is_best=True)
    assert os.path.samefile(tmp_path / BEST_NAME, tmp_path / step_name(1))  # no second copy on disk
    manager.save({"model": {"w": torch.ones(6)}}, 2, is_best=False)  # rotation deletes step 1
    assert not (tmp_path / step_name(1)).exists()
    best = load_checkpoint(tmp_path / BEST_NAME, sha256=manager.record["checkpoints"][BEST_NAME])
    assert torch.equal(best["model"]["w"], torch.arange(6.0))
    manager.save({"model": {"w": torch.zeros(6)}}, 3, is_best=True)
    assert os.path.samefile(tmp_path / BEST_NAME, tmp_path / step_name(3))
    assert torch.equal(load_checkpoint(tmp_path / BEST_NAME)["model"]["w"], torch.zeros(6))
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_wandb_is_optional_and_logs_the_steps(photo_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if wandb were not installed
    Pretrainer(_cfg(tmp_path / "a", photo_dir, **{"train.max_steps": 1, "train.wandb": True}), "dense",
               show_progress=False).run()
    assert "train.wandb=true but the wandb package is not installed" in capsys.readouterr().out

    calls = []

    class FakeRun:
        def log(self, values, step):
            calls.append((step, dict(values)))

        def finish(self):
            calls.append("finished")

    def init(**kwargs):
        calls.append(("init", kwargs["mode"], kwargs["config"]["train"]["max_steps"]))
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init, Image=lambda grid: grid))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    Pretrainer(_cfg(tmp_path / "b", photo_dir, **{"train.max_steps": 2, "train.wandb": True}), "dense",
               show_progress=False).run()
    assert calls[0] == ("init", "offline", 2) and calls[-1] == "finished"
    steps = [c for c in calls[1:-1] if isinstance(c, tuple)]
    assert [s for s, _ in steps] == [1, 2]
    assert all({"train/loss", "train/lr", "train/mask_ratio"} <= v.keys() for _, v in steps)


def test_plain_lines_say_how_far_the_run_is_and_when_it_ends(photo_dir, tmp_path, capsys):
    """A cluster log has no progress bar: each line gives the step of the run's last one (train.max_steps
    when it ends the run first) and, from the second step on, an ETA at this process's pace so far."""
    import re

    cfg = _cfg(tmp_path, photo_dir, **{"train.log_every": 1, "train.max_steps": 5})  # the epochs have 6
    Pretrainer(cfg, "dense", show_progress=False).run()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(lines) == 5 and lines[0].endswith(" | 1/5 (20 %)")  # no pace yet after one step
    for k, line in enumerate(lines[1:], start=2):
        eta = re.search(rf" \| {k}/5 \({20 * k} %\), eta (\d+):(\d\d):(\d\d)$", line)
        assert eta, line
    assert lines[-1].endswith("eta 0:00:00")
