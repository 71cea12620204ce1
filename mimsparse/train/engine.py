"""The training loop: :class:`Trainer` (a built run's ``run()``: epochs, best, stop, checkpoints at
epoch ends and, with ``train.save_every_steps`` / ``train.save_every_minutes``, within epochs) and
``train_one_epoch`` (data -> mask -> model -> loss -> gradient step -> log), as MAE's engine_pretrain.py.
It trains what :mod:`mimsparse.train.build` built and imports nothing from it.

One code path for one process and for ``torchrun`` (DDP): collectives are no-ops with one process.
The run's state is in :mod:`~mimsparse.train.run_state`, its save/resume in
:mod:`~mimsparse.train.run_checkpoints`, the gradient step in :mod:`~mimsparse.train.optim`, reporting
in :mod:`~mimsparse.train.logger`.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from mimsparse.errors import DataError, OutputError, TrainingError
from mimsparse.train import distributed
from mimsparse.train.data import EpochSampler, collate_skip_bad, seed_worker
from mimsparse.train.run_checkpoints import RunCheckpoints
from mimsparse.train.shards import ShardImages
from mimsparse.train.stop_signal import STOP_EXIT_STATUS

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


class Trainer(RunCheckpoints):
    """A built run (see :func:`mimsparse.train.build.build_run`); ``run()`` trains to the end (or
    ``train.max_steps``).

    Under ``torchrun`` (process group initialised, see :mod:`mimsparse.train.distributed`) the model is
    wrapped in DDP, each rank reads its share of every global batch, and rank 0 alone logs and
    writes checkpoints."""

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
        # One collective per step: the totals and whether any process was asked to stop (StopSignal),
        # so every process sees the same sum and all stop after this same step.
        totals = torch.tensor([float(window.loss_sum), window.batches, window.images, self.stop.received is not None],
                              dtype=torch.float64, device=self.device)
        loss_sum, batches, images, stops = distributed.all_reduce_sum(totals).tolist()
        self.stop_agreed = stops > 0
        if not batches:
            self.gradient_step.finish(self.state)
            return None
        record = self.gradient_step(loss_sum / batches, self.state)
        record["images"] = int(images)
        return record

    # ---- the run -------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train to the end (or ``train.max_steps``, or a stop signal: see
        :mod:`mimsparse.train.stop_signal`), writing a checkpoint every ``train.save_every_epochs``
        epochs, every ``train.save_every_steps`` steps / ``train.save_every_minutes`` minutes (0 = never)
        and at the end; checkpoint-best is the lowest epoch-mean loss. The output folder is
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
        self.start_writing()
        last = min(self.total_steps, cfg.train.max_steps) if cfg.train.max_steps else self.total_steps
        self.logger.start(st.step, last)  # one record per step: drop what a killed run logged after its checkpoint
        self.save_interval.saved()  # the minutes count from the run's start, not from building it
        history = []
        self.train_model.train()
        stop = self.finished()
        while st.epoch < cfg.train.epochs and not stop:
            records, stop = train_one_epoch(self)
            history += records
            self._end_epoch(stop)
        self.logger.close()
        if self.dist.enabled:
            torch.distributed.barrier()  # rank 0 has finished writing before any process leaves
        return {"history": history, "checkpoint": self.last_checkpoint, "state": st, "stopped_by": self.stopped_by}

    def _end_epoch(self, stop: bool) -> None:
        """After ``train_one_epoch``: the epoch counter, the replicas' check, best, the checkpoint."""
        cfg, st = self.cfg, self.state
        if not stop:
            st.epoch, st.batch_in_epoch = st.epoch + 1, 0
        if not distributed.replicas_agree(self.model.parameters()):
            raise TrainingError(f"the processes' parameters differ at step {st.step}; this is a bug, please "
                                f"report it")
        if self.stopped_by:  # a partial epoch: best waits for the epoch's end, after the resume
            is_best = False
        else:
            total, count = st.epoch_loss_sum, st.epoch_loss_count
            st.epoch_loss_sum, st.epoch_loss_count = 0.0, 0
            mean = total / count if count else float("inf")
            is_best = mean < st.best_loss
            st.best_loss = min(st.best_loss, mean)
        if self.dist.is_main and (stop or st.epoch % cfg.train.save_every_epochs == 0 or st.epoch == cfg.train.epochs
                                  or self.save_interval.due(st.step)):
            self.checkpoint(is_best, resume_point=self.stopped_by is not None)
        if self.stopped_by:
            self.say(f"stopped by {self.stopped_by} at step {st.step} (epoch {st.epoch}, batch {st.batch_in_epoch}"
                     f"): checkpoint {self.last_checkpoint}; continue with --resume auto (exit status "
                     f"{STOP_EXIT_STATUS})", flush=True)

    def checkpoint(self, is_best: bool = False, resume_point: bool = False) -> None:
        """Write a checkpoint of the run as it stands (main process only; the state after the last
        step, the epoch's loss sums included, so a resume from it equals not having stopped).
        ``resume_point``: periodic or a signal's stop, kept only until the next checkpoint."""
        self.last_checkpoint = self.save(is_best, resume_point)
        self.save_interval.saved()

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


def train_one_epoch(run: Trainer) -> tuple[list[dict], bool]:
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
            if record["loss"] is not None:  # the epoch's mean picks checkpoint-best; a checkpoint within it keeps the sums
                st.epoch_loss_sum, st.epoch_loss_count = st.epoch_loss_sum + record["loss"], st.epoch_loss_count + 1
            run.logger.step(record)
            if dist.is_main and cfg.train.vis_every and st.step % cfg.train.vis_every == 0 and window.last is not None:
                run.visualize(*window.last, run.out_dir / "vis" / f"step-{st.step:07d}.png")
        window, t0, compute = _Window(), time.perf_counter(), 0.0
        if cfg.train.max_steps and st.step >= cfg.train.max_steps:
            stop = True
            break
        if run.stop_agreed:  # agreed in optimizer_step's all-reduce: every process stops at this step
            run.stopped_by, stop = run.stop.reason(), True
            break
        # within the epoch only: its end saves in _end_epoch (once, with best and the epoch counter)
        if dist.is_main and st.batch_in_epoch < run.batches_per_epoch and run.save_interval.due(st.step):
            run.checkpoint(resume_point=True)
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
