"""A run's checkpoints as the engine sees them: what a checkpoint holds, claiming the output folder
before the first write, saving, and resuming (weights, optimizer, counters, RNG, the lr schedule at the
step reached). The files themselves are :mod:`mimsparse.train.checkpoint_manager`'s."""
from __future__ import annotations

from pathlib import Path

from mimsparse.config import config_from_dict
from mimsparse.errors import CheckpointError
from mimsparse.train.checkpoint import (check_model_matches, remove_stale_temp_files, require_training_checkpoint,
                                        rng_state, set_rng_state, versions)
from mimsparse.train.optim import lr_scheduler, set_hyperparameters, warmup_step_count
from mimsparse.train.resume import changes_history, check_changes, config_changes, describe, recorded_config
from mimsparse.train.run_state import RunBase, RunState


class RunCheckpoints(RunBase):
    """Save and resume of one run (the loop is :class:`mimsparse.train.engine.Trainer`)."""

    def checkpoint_state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "run": vars(self.state).copy(),
            "config": self.cfg.to_dict(),
            "backend": self.backend.name,  # informative only: any backend can load this
            "versions": versions(),
            "rng": rng_state(),
        }

    def claim_output_dir(self) -> str:
        """Make this run the owner of the output folder before its first write (a fresh start refuses
        another run's checkpoints unless ``overwrite``); returns the run id."""
        return self.checkpoints.claim(self.resumed_from is not None, self._may_replace(), say=self.say)

    def _may_replace(self) -> bool:
        """``--overwrite``, or ``--resume auto`` in a folder without a checkpoint to resume (what a run
        killed before its first checkpoint left there is replaced: a requeued job must start)."""
        return self.overwrite or (self.resume_auto and not self.checkpoints.has_checkpoints())

    def start_writing(self) -> None:
        """Before the first step: every process checks the folder may be this run's (all refuse another
        run's folder together); the main process claims it, records the config changes and the dense
        weights the run started from, and writes config.yaml."""
        if self.checkpoints.record is None:
            self.checkpoints.check_can_start(self.resumed_from is not None, self._may_replace())
        if not self.dist.is_main:
            return
        self.claim_output_dir()
        if self.config_changes:
            self.checkpoints.note("config_changes", changes_history(self.checkpoints.record, self.state.step,
                                                                    self.config_changes, self.command()))
        if self.init_record:
            self.checkpoints.note("init", self.init_record)  # the dense weights the run started from
        remove_stale_temp_files(self.out_dir)
        self.write_config()

    def save(self, is_best: bool = False, resume_point: bool = False) -> Path:
        """``resume_point``: a periodic checkpoint or a signal's stop, superseded by the next checkpoint
        (see :meth:`CheckpointManager.save`)."""
        self.claim_output_dir()
        return self.checkpoints.save(self.checkpoint_state(), self.state.step, is_best, resume_point)

    def load(self, path: str | Path | tuple[Path, dict]) -> None:
        """Resume from ``path``, or with ``"auto"`` from the newest checkpoint of the output folder that
        verifies (none there: a fresh start); ``(path, checkpoint)`` when the caller loaded it already.
        ``self.cfg`` is the config to continue under: every key that differs from the checkpoint's is
        said, refused where it changes what the weights mean (:mod:`mimsparse.train.resume`), and the
        lr schedule is rebuilt from it at the step reached."""
        if isinstance(path, tuple):
            path, ckpt = path
        elif str(path) == "auto":
            self.resume_auto = True
            found = self.checkpoints.load_latest(self.device, say=self.say)
            if found is None:
                return
            path, ckpt = found
        else:
            ckpt = self.checkpoints.load(path, self.device)
        require_training_checkpoint(ckpt, path, ("model", "config", "optimizer", "scheduler", "run", "rng"))
        check_model_matches(ckpt, self.cfg.model.name, path)
        run = ckpt["run"] if isinstance(ckpt["run"], dict) else {}
        self.config_changes = config_changes(config_from_dict(recorded_config(ckpt, path)), self.cfg)
        check_changes(self.config_changes, path, run.get("batch_in_epoch", 0), run.get("epoch", 0))
        try:
            self.model.load_state_dict(ckpt["model"], strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{path} does not match this model: {str(e).splitlines()[1:3]}") from e
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
            self.state = RunState(**ckpt["run"])
            set_rng_state(ckpt["rng"])
        except (ValueError, TypeError, KeyError, RuntimeError) as e:  # a state saved by another optimizer set-up
            raise CheckpointError(f"{path}: cannot restore the training state ({type(e).__name__}: "
                                  f"{(str(e).splitlines() or [''])[0][:200]}); start a new run from its weights "
                                  f"instead (tools/convert_to_dense.py) or use a checkpoint of this config") from e
        self._continue_schedule()
        for line in describe(self.config_changes):
            self.say(f"resume: {line}")
        self.resumed_from = Path(path)
        self.checkpoints.last_good = Path(path)

    def _continue_schedule(self) -> None:
        """The schedule of this config, at the step reached (the checkpoint's scheduler state holds the
        old base lr and length; its optimizer, the lr of its last step: neither is used). When the steps
        per epoch changed (batch size, data), the schedule continues from the epoch position reached."""
        cfg, st = self.cfg, self.state
        position = st.epoch * self.steps_per_epoch + st.batch_in_epoch // cfg.train.accum_steps
        self.schedule_offset = position - st.step
        self.total_steps = self.steps_per_epoch * cfg.train.epochs - self.schedule_offset
        set_hyperparameters(self.optimizer, cfg.optim.weight_decay, (cfg.optim.beta1, cfg.optim.beta2))
        self.scheduler = lr_scheduler(self.optimizer, self.lr, warmup_step_count(cfg, self.steps_per_epoch),
                                      self.steps_per_epoch * cfg.train.epochs, cfg.optim.min_lr, done=st.step,
                                      offset=self.schedule_offset)
        self.gradient_step.scheduler = self.scheduler
