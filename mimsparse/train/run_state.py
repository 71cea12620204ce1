"""A pretraining run's state: the parts :mod:`mimsparse.train.build` hands the engine (:class:`RunParts`),
the counters a checkpoint saves (:class:`RunState`), and what derives from them (schedule position,
progress, the end of the run, the config file of the run folder)."""
from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from mimsparse.backends import Backend
from mimsparse.config import PretrainConfig
from mimsparse.train.checkpoint import write_text_atomic
from mimsparse.train.checkpoint_manager import CheckpointManager
from mimsparse.train.distributed import DistEnv
from mimsparse.train.logger import RunLogger
from mimsparse.train.optim import GradientStep
from mimsparse.train.run_folder import RunFolder
from mimsparse.train.save_interval import SaveInterval
from mimsparse.train.shards import ShardImages
from mimsparse.train.stop_signal import StopSignal


@dataclass
class RunState:
    epoch: int = 0          # epoch in progress
    step: int = 0           # optimizer steps done (skipped non-finite steps included)
    batch_in_epoch: int = 0  # batches of the current epoch done (per process)
    best_loss: float = float("inf")
    skipped_steps: int = 0  # non-finite steps skipped so far (train.skip_nonfinite)
    epoch_loss_sum: float = 0.0  # losses of the epoch in progress before a stop on a signal (its mean picks best)
    epoch_loss_count: int = 0


@dataclass
class RunParts:
    """Everything a run is made of, built and checked before the loop starts."""
    cfg: PretrainConfig
    dist: DistEnv
    device: torch.device
    backend: Backend
    overwrite: bool          # a fresh start may replace another run's checkpoints in the output folder
    say: Callable            # print on the main process, nothing elsewhere
    amp_dtype: torch.dtype | None
    stop: StopSignal
    folder: RunFolder | None  # held by the main process from build to the end of run()
    dataset: object          # SeededImages or ShardImages
    steps_per_epoch: int
    model: torch.nn.Module   # the FCMAE itself
    train_model: torch.nn.Module  # what every process runs (DDP, compiled)
    lr: float
    optimizer: torch.optim.Optimizer
    gradient_step: GradientStep  # owns the scheduler and the loss scaler
    checkpoints: CheckpointManager
    logger: RunLogger


class RunBase:
    """The parts and state of one run, and what derives from them; no training and no files but the
    run's config.yaml."""

    def __init__(self, parts: RunParts):
        self.cfg, self.dist, self.device, self.backend = parts.cfg, parts.dist, parts.device, parts.backend
        self.out_dir = Path(parts.cfg.train.output_dir)
        self.overwrite, self.say, self.amp_dtype = parts.overwrite, parts.say, parts.amp_dtype
        self.stop, self.folder = parts.stop, parts.folder
        self.dataset, self.steps_per_epoch = parts.dataset, parts.steps_per_epoch
        self.batches_per_epoch = self.steps_per_epoch * self.cfg.train.accum_steps  # per process
        self.total_steps = self.steps_per_epoch * self.cfg.train.epochs
        self.model, self.train_model, self.lr = parts.model, parts.train_model, parts.lr
        self.optimizer, self.gradient_step = parts.optimizer, parts.gradient_step
        self.scheduler = parts.gradient_step.scheduler
        self.checkpoints, self.logger = parts.checkpoints, parts.logger
        self.state = RunState()
        self.last_checkpoint = None
        self.resumed_from = None
        self.resume_auto = False
        self.stopped_by: str | None = None  # the signal that stopped run() early
        # checkpoints within an epoch; run() starts its minutes
        self.save_interval = SaveInterval(self.cfg.train.save_every_steps, self.cfg.train.save_every_minutes)
        self.stop_agreed = False  # some process of the job was signalled (the last optimizer_step's all-reduce)
        self.config_changes: dict[str, tuple] = {}  # on resume: key -> (checkpoint's value, this run's)
        self.schedule_offset = 0
        self.init_record: dict | None = None  # the dense weights the run started from (model.init)

    @property
    def scaler(self) -> torch.amp.GradScaler:
        """The loss scaler (fp16; a pass-through otherwise), owned by the gradient step."""
        return self.gradient_step.scaler

    @scaler.setter
    def scaler(self, scaler: torch.amp.GradScaler) -> None:
        self.gradient_step.scaler = scaler

    @property
    def progress(self) -> float:
        """Share of the run's schedule done (progressive masking)."""
        return (self.state.step + self.schedule_offset) / max(1, self.total_steps + self.schedule_offset)

    def finished(self) -> bool:
        cfg, st = self.cfg, self.state
        return st.epoch >= cfg.train.epochs or (bool(cfg.train.max_steps) and st.step >= cfg.train.max_steps)

    def _kept(self) -> str:
        return self.checkpoints.kept()

    def _data_name(self) -> str:
        if isinstance(self.dataset, ShardImages):
            return f"the shards {self.cfg.data.path!r}"
        return f"data folder {self.cfg.data.path!r}" if self.cfg.data.path else "the bundled photos"

    def write_config(self) -> Path:
        """``config.yaml`` in the run folder: the resolved config (``--config`` of a later run reads it
        back) under a comment with the command line that started this part of the run."""
        import yaml

        start = f"resumed at step {self.state.step}" if self.resumed_from else "started"
        header = f"# mimsparse run {start}: {self.command()}\n"
        return write_text_atomic(self.out_dir / "config.yaml", header + yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))

    @staticmethod
    def command() -> str:
        """The command line that started this part of the run."""
        return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "(library call)"
