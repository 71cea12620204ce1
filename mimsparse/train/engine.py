"""Pretraining: ``train_one_epoch`` (data -> mask -> model -> loss -> gradient step -> log) and the
:class:`Pretrainer` that holds a run's objects, resumes it and writes its checkpoints.

One code path for one process and for ``torchrun`` (DDP): collectives are no-ops with one process.
Wiring is in :mod:`mimsparse.train.build`, the gradient step in :mod:`~mimsparse.train.optim`,
checkpoint files in :mod:`~mimsparse.train.checkpoint_manager`, reporting in :mod:`~mimsparse.train.logger`.
"""
from __future__ import annotations

import contextlib
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from mimsparse.backends import Backend, get_backend
from mimsparse.config import PretrainConfig, config_from_dict
from mimsparse.errors import CheckpointError, DataError, OutputError, TrainingError
from mimsparse.train import distributed
from mimsparse.train.build import (build_dataset, build_model, build_optimization, check_train_config,
                                   start_from_dense, warmup_steps)
from mimsparse.train.checkpoint import (check_model_matches, remove_stale_temp_files,
                                        require_training_checkpoint, rng_state, set_rng_state, versions,
                                        write_text_atomic)
from mimsparse.train.checkpoint_manager import CheckpointManager, checkpoint_size_estimate
from mimsparse.train.compile import check_compile_mode
from mimsparse.train.data import EpochSampler, collate_skip_bad, seed_worker
from mimsparse.train.logger import RunLogger
from mimsparse.train.optim import GradientStep, lr_scheduler, set_hyperparameters
from mimsparse.train.resume import changes_history, check_changes, config_changes, describe, recorded_config
from mimsparse.train.run_folder import hold
from mimsparse.train.stop_signal import STOP_EXIT_STATUS, StopSignal
from mimsparse.train.shards import ShardImages
from mimsparse.train.precision import check_amp

VIS_SAMPLES = 4  # rows of the periodic reconstruction PNG


def step_seed(seed: int, batch_id: int) -> int:
    """Every random draw of a batch (drop path) derives from (seed, batch): resume is exact."""
    return (seed * 1_000_003 + batch_id) % (2**63)


def mask_seed(sample_seed: int) -> int:
    """A sample's mask generator seed, from the seed the sampler drew for that sample (which also
    drives its augmentation): the mask of a sample is the same whatever the batch size, the
    accumulation steps or the number of processes."""
    return (sample_seed * 6_364_136_223_846_793_005 + 1_442_695_040_888_963_407) % (2**63)


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
class _Window:
    """What the micro-batches of one optimizer step (gradient accumulation) leave behind."""
    loss_sum: float | torch.Tensor = 0.0
    batches: int = 0
    images: int = 0
    synced: bool = True     # the last backward of the window synchronised gradients (DDP)
    last: tuple | None = None  # (images, visible) of the last micro-batch, for the reconstruction PNG

    def add(self, loss: torch.Tensor, images: torch.Tensor, visible: torch.Tensor, synced: bool) -> None:
        self.loss_sum += loss
        self.batches += 1
        self.images += images.shape[0]
        self.synced, self.last = synced, (images, visible)


class Pretrainer:
    """Holds the objects of one run; ``run()`` trains to the end (or ``train.max_steps``).

    Under ``torchrun`` (process group initialised, see :mod:`mimsparse.train.distributed`) the model is
    wrapped in DDP, each rank reads its share of every global batch, and rank 0 alone logs and
    writes checkpoints."""

    def __init__(self, cfg: PretrainConfig, backend: Backend | str = "dense", device: str = "cpu",
                 resume: str | Path | None = None, show_progress: bool = True, overwrite: bool = False):
        self.cfg = cfg
        self.dist = distributed.current()
        self.device = torch.device(device)
        self.backend = get_backend(backend) if isinstance(backend, str) else backend
        self.out_dir = Path(cfg.train.output_dir)
        self.overwrite = overwrite  # a fresh start may replace another run's checkpoints in out_dir
        self.say = print if self.dist.is_main else (lambda *a, **k: None)
        check_train_config(cfg)
        self.amp_dtype = check_amp(cfg.train.amp, self.backend, self.device)
        check_compile_mode(cfg.train.compile)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise TrainingError("--device cuda but CUDA is not available; use --device cpu")
        self.stop = StopSignal(cfg.train.stop_signals)
        # the main process holds the folder from here to the end of run() (see mimsparse.train.run_folder)
        self.folder = hold(self.out_dir, _command(), self.dist.is_main, self.dist.enabled, self.device)
        try:
            self._build(cfg, resume, show_progress)
        except BaseException:
            if self.folder is not None:
                self.folder.abandon()
            raise

    def _build(self, cfg: PretrainConfig, resume, show_progress: bool) -> None:
        self.dataset, self.steps_per_epoch = build_dataset(cfg, self.dist.world_size)
        self.batches_per_epoch = self.steps_per_epoch * cfg.train.accum_steps  # per process
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        # self.model is the FCMAE itself; self.train_model what every process runs (DDP, compiled)
        self.model, self.train_model = build_model(cfg, self.backend, self.device, self.dist.enabled)
        self.lr = cfg.lr(self.dist.world_size)
        self.optimizer, self.scheduler, scaler = build_optimization(
            cfg, self.model, self.lr, self.steps_per_epoch, self.total_steps, self.amp_dtype, self.device)
        self.gradient_step = GradientStep(self.model, self.optimizer, self.scheduler, scaler, cfg.train.clip_grad,
                                          cfg.train.skip_nonfinite, self._kept)
        self.state = RunState()
        self.checkpoints = CheckpointManager(self.out_dir, cfg.train.keep_last)
        if self.dist.is_main:
            self.checkpoints.check_free_space(checkpoint_size_estimate(self.model, self.optimizer))
        self.logger = RunLogger(self.out_dir, self.dist.is_main, show_progress, cfg.train.log_every,
                                cfg.train.tensorboard, cfg.to_dict() if cfg.train.wandb else None)
        self.last_checkpoint = None
        self.resumed_from = None
        self.resume_auto = False
        self.stopped_by: str | None = None  # the signal that stopped run() early
        self.config_changes: dict[str, tuple] = {}  # on resume: key -> (checkpoint's value, this run's)
        self.schedule_offset = 0
        if resume:
            self.load(resume)
        resumed = self.resumed_from is not None
        self.cfg, self.init_record, line = start_from_dense(self.cfg, self.model, resumed,
                                                            self.checkpoints.read_record() if resumed else None)
        if line:
            self.say(line)

    @property
    def scaler(self) -> torch.amp.GradScaler:
        """The loss scaler (fp16; a pass-through otherwise), owned by the gradient step."""
        return self.gradient_step.scaler

    @scaler.setter
    def scaler(self, scaler: torch.amp.GradScaler) -> None:
        self.gradient_step.scaler = scaler

    # ---- checkpoints ---------------------------------------------------------------------------
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

    def save(self, is_best: bool = False) -> Path:
        self.claim_output_dir()
        return self.checkpoints.save(self.checkpoint_state(), self.state.step, is_best)

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
        self.scheduler = lr_scheduler(self.optimizer, self.lr, warmup_steps(cfg, self.steps_per_epoch),
                                      self.steps_per_epoch * cfg.train.epochs, cfg.optim.min_lr, done=st.step,
                                      offset=self.schedule_offset)
        self.gradient_step.scheduler = self.scheduler

    @property
    def progress(self) -> float:
        """Share of the run's schedule done (progressive masking)."""
        return (self.state.step + self.schedule_offset) / max(1, self.total_steps + self.schedule_offset)

    def finished(self) -> bool:
        cfg, st = self.cfg, self.state
        return st.epoch >= cfg.train.epochs or (bool(cfg.train.max_steps) and st.step >= cfg.train.max_steps)

    # ---- one batch -----------------------------------------------------------------------------
    def loader(self, epoch: int, start_batch: int) -> DataLoader:
        cfg = self.cfg
        if isinstance(self.dataset, ShardImages):  # an IterableDataset: each worker streams its shards
            stream = self.dataset.epoch(cfg.train.seed, epoch, self.dist.rank, self.dist.world_size,
                                        cfg.train.batch_size, self.batches_per_epoch, start_batch)
            return DataLoader(stream, batch_size=cfg.train.batch_size, num_workers=cfg.data.num_workers,
                              collate_fn=collate_skip_bad, worker_init_fn=seed_worker, persistent_workers=False,
                              pin_memory=self.device.type == "cuda")
        sampler = EpochSampler(len(self.dataset), cfg.train.seed, epoch, cfg.data.repeat,
                               start=start_batch * cfg.train.batch_size, rank=self.dist.rank,
                               world_size=self.dist.world_size, batch_size=cfg.train.batch_size * cfg.train.accum_steps)
        return DataLoader(self.dataset, batch_size=cfg.train.batch_size, sampler=sampler, drop_last=True,
                          num_workers=cfg.data.num_workers, collate_fn=collate_skip_bad, worker_init_fn=seed_worker,
                          persistent_workers=False, pin_memory=self.device.type == "cuda")

    def make_mask(self, images_bchw: torch.Tensor, seeds_b: torch.Tensor, progress: float) -> torch.Tensor:
        """bool [B, h, w], True = visible. One model.make_mask call per sample, each with a generator
        seeded by the sample's own seed (see :func:`mask_seed`)."""
        masks = [self.model.make_mask(images_bchw[i:i + 1], torch.Generator().manual_seed(mask_seed(int(s))),
                                      progress=progress)
                 for i, s in enumerate(seeds_b.tolist())]
        return torch.cat(masks)

    def train_step(self, images: torch.Tensor, seeds: torch.Tensor, batch_id: int, sync: bool = True):
        """Forward + backward of one micro-batch; ``batch_id`` counts this process's batches since the
        run began. ``sync=False`` keeps DDP from averaging gradients (not the last micro-batch of an
        accumulation window). Returns (loss, detached; visible mask)."""
        cfg = self.cfg
        progress = self.progress
        visible = self.make_mask(images, seeds, progress=progress)
        # compiled: the masks' fixed count makes every packed shape static (see mimsparse.train.compile)
        count = self.model.visible_count(visible.shape[1:], progress) if cfg.train.compile != "off" else None
        torch.manual_seed(step_seed(cfg.train.seed, batch_id * self.dist.world_size + self.dist.rank))  # drop path
        no_sync = self.train_model.no_sync if self.dist.enabled and not sync else contextlib.nullcontext
        with no_sync():
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                loss, _, _ = self.train_model(images, visible, num_visible=count)
            self.scaler.scale(loss / cfg.train.accum_steps).backward()
        return loss.detach().float(), visible

    def _all_ranks_have_images(self, images: torch.Tensor) -> bool:
        """A batch whose images were all unreadable is skipped by every process together (DDP needs
        every process in each gradient exchange)."""
        have = images.numel() > 0
        if not self.dist.enabled:
            return have
        return int(distributed.all_reduce_sum(torch.tensor([int(have)], device=self.device))) == self.dist.world_size

    def optimizer_step(self, window: _Window) -> dict | None:
        """Average the window's gradients and loss over processes, then one gradient step. Returns the
        log record (``None`` when no micro-batch of the window had images: no update, the schedule
        moves on)."""
        if window.batches and self.dist.enabled and not window.synced:
            distributed.average_gradients(self.model.parameters())
        totals = torch.tensor([float(window.loss_sum), window.batches, window.images], dtype=torch.float64,
                              device=self.device)
        loss_sum, batches, images = distributed.all_reduce_sum(totals).tolist()
        if not batches:
            self.gradient_step.finish(self.state)
            return None
        record = self.gradient_step(loss_sum / batches, self.state)
        record["images"] = int(images)
        return record

    def _kept(self) -> str:
        last = self.checkpoints.last_good  # written by this run (finite weights) or resumed from
        return f"the last good checkpoint {str(last)!r} is kept" if last else "no checkpoint was written yet"

    def _data_name(self) -> str:
        if isinstance(self.dataset, ShardImages):
            return f"the shards {self.cfg.data.path!r}"
        return f"data folder {self.cfg.data.path!r}" if self.cfg.data.path else "the bundled photos"

    # ---- the run -------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train to the end (or ``train.max_steps``, or a stop signal: see
        :mod:`mimsparse.train.stop_signal`), writing a checkpoint every ``train.save_every_epochs``
        epochs and at the end; checkpoint-best is the lowest epoch-mean loss. The output folder is
        let go at the end (removed when this start created it and failed before its first step)."""
        first_step = self.state.step
        try:
            with self.stop:
                return self._run()
        except BaseException:
            if self.folder is not None and self.state.step == first_step and self.last_checkpoint is None:
                self.folder.abandon()
            raise
        finally:
            if self.folder is not None:
                self.folder.release()

    def _run(self) -> dict:
        cfg, st = self.cfg, self.state
        if self.resumed_from is not None and self.finished():  # nothing to do: nothing written, not even a log
            return {"history": [], "checkpoint": None, "state": st, "stopped_by": None}
        if self.checkpoints.record is None:  # every process: all refuse another run's folder together
            self.checkpoints.check_can_start(self.resumed_from is not None, self._may_replace())
        if self.dist.is_main:
            self.claim_output_dir()
            if self.config_changes:
                self.checkpoints.note("config_changes", changes_history(self.checkpoints.record, st.step,
                                                                        self.config_changes, self.command()))
            if self.init_record:
                self.checkpoints.note("init", self.init_record)  # the dense weights the run started from
            remove_stale_temp_files(self.out_dir)
            self.write_config()
        self.logger.start(st.step)  # one record per step: drop what a killed run logged after its checkpoint
        history = []
        self.train_model.train()
        stop = self.finished()
        while st.epoch < cfg.train.epochs and not stop:
            records, stop = train_one_epoch(self)
            history += records
            if not stop:
                st.epoch, st.batch_in_epoch = st.epoch + 1, 0
            if not distributed.replicas_agree(self.model.parameters()):
                raise TrainingError(f"the processes' parameters differ at step {st.step}; this is a bug, please "
                                    f"report it")
            total, count = st.epoch_loss_sum, st.epoch_loss_count  # the part before a signal stopped the epoch
            for r in records:
                if r["loss"] is not None:
                    total, count = total + r["loss"], count + 1
            if self.stopped_by:  # a partial epoch: best waits for the epoch's end, after the resume
                st.epoch_loss_sum, st.epoch_loss_count, is_best = total, count, False
            else:
                st.epoch_loss_sum, st.epoch_loss_count = 0.0, 0
                mean = total / count if count else float("inf")
                is_best = mean < st.best_loss
                st.best_loss = min(st.best_loss, mean)
            if self.dist.is_main and (stop or st.epoch % cfg.train.save_every_epochs == 0 or st.epoch == cfg.train.epochs):
                self.last_checkpoint = self.save(is_best)
            if self.stopped_by:
                self.say(f"stopped by {self.stopped_by} at step {st.step} (epoch {st.epoch}, batch {st.batch_in_epoch}"
                         f"): checkpoint {self.last_checkpoint}; continue with --resume auto (exit status "
                         f"{STOP_EXIT_STATUS})", flush=True)
        self.logger.close()
        if self.dist.enabled:
            torch.distributed.barrier()  # rank 0 has finished writing before any process leaves
        return {"history": history, "checkpoint": self.last_checkpoint, "state": st, "stopped_by": self.stopped_by}

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

    def visualize(self, images: torch.Tensor, visible: torch.Tensor, path: Path) -> Path:
        """Reconstruction grid of (up to 4 of) the given images with their training masks."""
        from mimsparse.visualize import grid_image, reconstruct

        n = min(VIS_SAMPLES, images.shape[0])
        grid = grid_image(reconstruct(self.model, images[:n], visible[:n]))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            grid.save(path)
        except OSError as e:
            raise OutputError(f"cannot write {str(path)!r} ({e.strerror or e}); training stopped and {self._kept()}. "
                              f"Free disk space or turn the pictures off with train.vis_every=0") from e
        self.logger.image(grid, self.state.step)
        return path


def _command() -> str:
    """Who holds a run folder, for the refusal a second process gets."""
    if not (sys.argv and sys.argv[0]):
        return "a library call"
    script = Path(sys.argv[0])
    return f"python -m {script.parent.name}" if script.name == "__main__.py" else script.name


def train_one_epoch(run: Pretrainer) -> tuple[list[dict], bool]:
    """The rest of the current epoch from ``run.state.batch_in_epoch``: every ``train.accum_steps``
    micro-batches one gradient step, logged. Returns (this epoch's step records, stopped at
    ``train.max_steps``)."""
    cfg, st, dist = run.cfg, run.state, run.dist
    records, unreadable, windows, stop = [], 0, 0, False
    run.logger.epoch(st.epoch, run.batches_per_epoch, st.batch_in_epoch)
    window, t0, compute = _Window(), time.perf_counter(), 0.0
    for images, seeds, n_bad in run.loader(st.epoch, st.batch_in_epoch):
        unreadable += n_bad
        last_of_window = (st.batch_in_epoch + 1) % cfg.train.accum_steps == 0
        if run._all_ranks_have_images(images):
            t_batch = time.perf_counter()
            images = images.to(run.device, non_blocking=True)
            batch_id = st.epoch * run.batches_per_epoch + st.batch_in_epoch
            loss, visible = run.train_step(images, seeds, batch_id, sync=last_of_window)
            window.add(loss, images, visible, last_of_window)
            compute += time.perf_counter() - t_batch
        st.batch_in_epoch += 1
        run.logger.batch_done()
        if not last_of_window:
            continue
        progress = run.progress
        record = run.optimizer_step(window)
        windows += 1
        if record is not None:
            elapsed = max(time.perf_counter() - t0, 1e-9)
            record.update(images_per_s=record.pop("images") / elapsed, mask_ratio=run.model.masker.ratio_at(progress),
                          data_time=max(elapsed - compute, 0.0), compute_time=compute)
            records.append(record)
            run.logger.step(record)
            if dist.is_main and cfg.train.vis_every and st.step % cfg.train.vis_every == 0 and window.last is not None:
                run.visualize(*window.last, run.out_dir / "vis" / f"step-{st.step:07d}.png")
        window, t0, compute = _Window(), time.perf_counter(), 0.0
        if cfg.train.max_steps and st.step >= cfg.train.max_steps:
            stop = True
            break
        if run.stop.requested(run.device):  # every process, after every step: all stop at the same step
            run.stopped_by, stop = run.stop.reason(), True
            break
    run.logger.epoch_done()
    if dist.enabled:
        unreadable = int(distributed.all_reduce_sum(torch.tensor([unreadable], device=run.device)))
    if unreadable and dist.is_main:
        print(f"epoch {st.epoch}: skipped {unreadable} unreadable image(s)")
    if windows and not records:  # every process saw the same totals (all-reduced)
        raise DataError(
            f"epoch {st.epoch}: not one readable image in {run._data_name()} ({unreadable} unreadable "
            f"image(s) skipped over {windows} step(s)); training stopped and {run._kept()}. Check the "
            f"files (permissions, format, size) and resume with --resume auto")
    return records, stop
