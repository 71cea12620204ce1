"""Where a run reports: ``log.jsonl`` (every step, one record per step across resumes), TensorBoard
scalars (every step) and reconstruction grids, optionally Weights & Biases (``train.wandb``), and the progress bar or, without one, a plain line
every ``train.log_every`` steps. Only the main process reports; the others get a logger that does nothing."""
from __future__ import annotations

import datetime
import os
import time
from pathlib import Path

from tqdm import tqdm

from mimsparse.errors import OutputError
from mimsparse.train.run_log import RunLog

SCALARS = ("loss", "lr", "grad_norm", "images_per_s", "mask_ratio", "data_time", "compute_time")


def tensorboard_writer(folder: Path):
    """A SummaryWriter when the tensorboard package is installed, else None (logging goes to log.jsonl)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))


def wandb_run(out_dir: Path, config: dict):
    """A Weights & Biases run in ``out_dir`` (offline unless WANDB_MODE says otherwise, so it works
    without network; ``wandb sync`` uploads it later), or None with a one-line note when wandb is
    not installed."""
    try:
        import wandb
    except ImportError:
        print("train.wandb=true but the wandb package is not installed (pip install wandb); logging to "
              "log.jsonl and TensorBoard only")
        return None
    return wandb.init(project="mimsparse", name=out_dir.name, dir=str(out_dir), config=config,
                      mode=os.environ.get("WANDB_MODE", "offline"))


class Pace:
    """How far a run is and when it ends, for plain log lines (a cluster log has no bar): the remaining
    steps at this process's mean pace since its first step, which holds one-off costs (allocation,
    compilation) and so is left out."""

    def __init__(self, last_step: int):
        self.last_step = last_step  # 0 = not known
        self._first: tuple[int, float] | None = None  # (step, time) when this process's first step ended

    def step_done(self, step: int) -> None:
        if self._first is None:
            self._first = (step, time.monotonic())

    def describe(self, step: int) -> str:
        """`` | 2110/7500 (28 %), eta 0:58:12``; without the ETA before a second step; "" without a last step."""
        if not self.last_step:
            return ""
        done = f" | {step}/{self.last_step} ({100 * step // self.last_step} %)"
        if self._first is None or step <= self._first[0]:
            return done
        per_step = (time.monotonic() - self._first[1]) / (step - self._first[0])
        remaining = datetime.timedelta(seconds=round(per_step * max(self.last_step - step, 0)))
        return f"{done}, eta {remaining}"


class RunLogger:
    def __init__(self, out_dir: Path, main: bool, show_progress: bool, log_every: int, tensorboard: bool,
                 wandb_config: dict | None = None):
        self.main, self.show_progress, self.log_every = main, show_progress and main, max(1, log_every)
        self.log = RunLog(out_dir / "log.jsonl")
        self.tensorboard = tensorboard and main
        self.out_dir = out_dir
        self.wandb_config = wandb_config if main else None  # train.wandb=true: the run's config
        self.writer = None
        self.wandb = None
        self.bar = None
        self.pace = Pace(0)

    def start(self, step: int, last_step: int = 0) -> None:
        """Before the first step: drop what a killed run logged after the checkpoint it resumes from.
        ``last_step``: where the run ends, for the plain line's ETA (0 = not known)."""
        self.pace = Pace(last_step)
        if self.main:
            self.log.start(step)
            if self.tensorboard:
                self.writer = self._tensorboard(lambda: tensorboard_writer(self.out_dir / "tensorboard"))
            if self.wandb_config is not None:
                self.wandb = wandb_run(self.out_dir, self.wandb_config)

    def epoch(self, epoch: int, total: int, initial: int) -> None:
        self.bar = tqdm(total=total, initial=initial, disable=not self.show_progress, desc=f"epoch {epoch}",
                        dynamic_ncols=True)

    def batch_done(self) -> None:
        self.bar.update(1)

    def step(self, record: dict) -> None:
        if not self.main:
            return
        self.log.write(record)
        loss = f"{record['loss']:.4f}" if record["loss"] is not None else "skipped"
        every = record["step"] % self.log_every == 0
        scalars = {f"train/{key}": record[key] for key in SCALARS if record.get(key) is not None}
        if self.writer is not None:
            def add_scalars():
                for tag, value in scalars.items():
                    self.writer.add_scalar(tag, value, record["step"])

            self._tensorboard(add_scalars)
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])
        if self.show_progress:
            self.bar.set_postfix(loss=loss, lr=f"{record['lr']:.2e}", img_s=f"{record['images_per_s']:.1f}")
        elif every:
            print(f"step {record['step']} | epoch {record['epoch']} | loss {loss} | lr {record['lr']:.3e} | "
                  f"{record['images_per_s']:.1f} img/s | mask ratio {record['mask_ratio']:.3g}"
                  f"{self.pace.describe(record['step'])}", flush=True)
        self.pace.step_done(record["step"])

    def image(self, grid, step: int) -> None:
        if self.writer is not None:
            import numpy as np

            self._tensorboard(lambda: self.writer.add_image("reconstruction", np.asarray(grid), step, dataformats="HWC"))
        if self.wandb is not None:
            import wandb

            self.wandb.log({"reconstruction": wandb.Image(grid)}, step=step)

    def epoch_done(self) -> None:
        self.bar.close()

    def _tensorboard(self, write):
        """TensorBoard's writer reports a failed write (full disk) from its background thread at a later
        call: any OSError of it is one line naming the folder."""
        try:
            return write()
        except OSError as e:
            self.writer = None
            folder = self.out_dir / "tensorboard"
            raise OutputError(f"cannot write the TensorBoard events in {str(folder)!r} ({e.strerror or e}); the "
                              f"checkpoints in {str(self.out_dir)!r} are kept. Free disk space, then resume with "
                              f"--resume auto (or set train.tensorboard=false)") from e

    def close(self) -> None:
        if self.writer is not None:
            self._tensorboard(self.writer.close)
        if self.wandb is not None:
            self.wandb.finish()
