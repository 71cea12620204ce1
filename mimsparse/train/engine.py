"""Pretraining loop: data -> mask -> model -> loss -> optimizer -> checkpoint.

One code path for one process and for ``torchrun`` (DDP): collectives are no-ops with one process.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from mimsparse.train import distributed
from mimsparse.backends import Backend, get_backend
from mimsparse.models.build import build_fcmae
from mimsparse.train.compile import check_compile_mode, compile_model
from mimsparse.train.checkpoint import (check_model_matches, check_writable_dir, load_checkpoint, remove_stale_temp_files,
                                  require_training_checkpoint, rng_state, set_rng_state, versions)
from mimsparse.train.checkpoint_manager import CheckpointManager, checkpoint_size_estimate
from mimsparse.config import PretrainConfig, config_from_dict
from mimsparse.train.data import (EpochSampler, FileSource, SeededImages, bundled_photo_paths, collate_skip_bad, list_images,
                            pretrain_transform, seed_worker)
from mimsparse.evaluate.datasets import is_builtin, load_labelled
from mimsparse.errors import CheckpointError, ConfigError, DataError, OutputError, TrainingError
from mimsparse.masking import check_image_size
from mimsparse.train.run_log import RunLog

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
VIS_SAMPLES = 4  # rows of the periodic reconstruction PNG


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """lr multiplier per iteration: linear warm-up, then half a cosine down to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def step_seed(seed: int, batch_id: int) -> int:
    """Every random draw of a batch (drop path) derives from (seed, batch): resume is exact."""
    return (seed * 1_000_003 + batch_id) % (2**63)


def mask_seed(sample_seed: int) -> int:
    """A sample's mask generator seed, from the seed the sampler drew for that sample (which also
    drives its augmentation): the mask of a sample is the same whatever the batch size, the
    accumulation steps or the number of processes."""
    return (sample_seed * 6_364_136_223_846_793_005 + 1_442_695_040_888_963_407) % (2**63)


def param_groups(model: torch.nn.Module, weight_decay: float):
    """No weight decay on biases, norms, GRN and the mask token (as MAE/FCMAE)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith("mask_token") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def check_train_config(cfg: PretrainConfig) -> None:
    """Values the dataclass types cannot rule out, refused by key before anything is built."""
    ratio = cfg.mask.ratio
    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"mask.ratio must be in (0, 1) for pretraining (the loss is over the masked patches "
                          f"and some must stay visible), got {ratio}")
    minimum = {"train.batch_size": (cfg.train.batch_size, 1), "train.accum_steps": (cfg.train.accum_steps, 1),
               "train.epochs": (cfg.train.epochs, 1), "train.save_every_epochs": (cfg.train.save_every_epochs, 1),
               "data.repeat": (cfg.data.repeat, 1), "data.num_workers": (cfg.data.num_workers, 0),
               "train.keep_last": (cfg.train.keep_last, 0), "train.max_steps": (cfg.train.max_steps, 0),
               "train.skip_nonfinite": (cfg.train.skip_nonfinite, 0), "train.vis_every": (cfg.train.vis_every, 0),
               "train.clip_grad": (cfg.train.clip_grad, 0.0)}
    for key, (value, low) in minimum.items():
        if value < low:
            raise ConfigError(f"config key {key!r} must be >= {low}, got {value}")
    if not 0.0 < cfg.data.min_scale <= 1.0:
        raise ConfigError(f"config key 'data.min_scale' must be in (0, 1], got {cfg.data.min_scale}")


def check_amp(amp: str, backend: Backend, device: torch.device) -> torch.dtype | None:
    """``train.amp`` -> autocast dtype, or a TrainingError/TypeError with the reason it cannot run."""
    if amp not in AMP_DTYPES:
        raise TrainingError(f"train.amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}")
    dtype = AMP_DTYPES[amp]
    if dtype is not None:
        # bf16 autocast runs on CPU too (dense, packed); fp16 needs loss scaling and is slow there
        if dtype == torch.float16 and torch.device(device).type != "cuda":
            raise TrainingError(f"train.amp=fp16 is for CUDA; on {torch.device(device).type} use train.amp=bf16 "
                                f"(dense and packed backends) or train.amp=none")
        backend.check_dtype(dtype, torch.device(device))
    return dtype


@dataclass
class RunState:
    epoch: int = 0          # epoch in progress
    step: int = 0           # optimizer steps done (skipped non-finite steps included)
    batch_in_epoch: int = 0  # batches of the current epoch done (per process)
    best_loss: float = float("inf")
    skipped_steps: int = 0  # non-finite steps skipped so far (train.skip_nonfinite)


@dataclass
class _Window:
    """What the micro-batches of one optimizer step (gradient accumulation) leave behind."""
    loss_sum: float | torch.Tensor = 0.0
    batches: int = 0
    images: int = 0
    synced: bool = True     # the last backward of the window synchronised gradients (DDP)
    last: tuple | None = None  # (images, visible) of the last micro-batch, for the reconstruction PNG


def pretrain_source(cfg: PretrainConfig):
    """data.path: "" = the bundled photos, a built-in dataset name (its training images), or a folder."""
    if not cfg.data.path:
        return FileSource(bundled_photo_paths())
    if is_builtin(cfg.data.path):
        return load_labelled(cfg.data.path, "train")
    return FileSource(list_images(cfg.data.path))


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
        self.show_progress = show_progress and self.dist.is_main
        self.out_dir = Path(cfg.train.output_dir)
        self.overwrite = overwrite  # a fresh start may replace another run's checkpoints in out_dir
        self.say = print if self.dist.is_main else (lambda *a, **k: None)
        check_train_config(cfg)
        self.amp_dtype = check_amp(cfg.train.amp, self.backend, self.device)
        check_compile_mode(cfg.train.compile)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise TrainingError("--device cuda but CUDA is not available; use --device cpu")
        check_writable_dir(self.out_dir)

        self.dataset = SeededImages(pretrain_source(cfg), pretrain_transform(cfg.data.img_size, cfg.data.min_scale))
        accum, world = cfg.train.accum_steps, self.dist.world_size
        # per process; an epoch is cut to whole optimizer steps of every process
        self.steps_per_epoch = len(self.dataset) * cfg.data.repeat // (cfg.train.batch_size * accum * world)
        self.batches_per_epoch = self.steps_per_epoch * accum
        if self.steps_per_epoch == 0:
            raise DataError(f"{len(self.dataset)} images x data.repeat={cfg.data.repeat} is less than one optimizer step "
                            f"of {cfg.train.batch_size * accum * world} images (train.batch_size={cfg.train.batch_size}"
                            f" x train.accum_steps={accum} x {world} process(es)); lower train.batch_size or raise "
                            f"data.repeat")
        self.total_steps = self.steps_per_epoch * cfg.train.epochs

        torch.manual_seed(cfg.train.seed)
        self.model = build_fcmae(cfg, self.backend).to(self.device)
        try:
            check_image_size(cfg.data.img_size, cfg.data.img_size, self.model.patch_size)
        except ValueError as e:
            raise ConfigError(f"data.img_size={cfg.data.img_size}: {e}") from None
        # The model every process runs (DDP averages gradients); self.model is the FCMAE itself.
        self.train_model = self.model
        if self.dist.enabled:
            # Every parameter gets a gradient at every step (no find_unused_parameters). Backends that
            # compute in channels_last (dense) return some weight gradients in that layout; DDP then
            # copies them into its buckets and says so once per process: harmless, so not shown.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
            self.train_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.train_model = compile_model(self.train_model, cfg.train.compile)
        self.lr = cfg.lr(world)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.optim.weight_decay), lr=self.lr,
                                           betas=(cfg.optim.beta1, cfg.optim.beta2))
        warmup = max(1, round(cfg.optim.warmup_epochs * self.steps_per_epoch))
        min_ratio = cfg.optim.min_lr / self.lr if self.lr > 0 else 0.0
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, warmup, self.total_steps, min_ratio))
        # fp16 gradients underflow without loss scaling; bf16 and fp32 need none (then a pass-through)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.state = RunState()
        self.checkpoints = CheckpointManager(self.out_dir, cfg.train.keep_last)
        if self.dist.is_main:
            self.checkpoints.check_free_space(checkpoint_size_estimate(self.model, self.optimizer))
        self.last_checkpoint = None
        self.resumed_from = None
        if resume:
            self.load(resume)

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
        return self.checkpoints.claim(self.resumed_from is not None, self.overwrite, say=self.say)

    def save(self, is_best: bool = False) -> Path:
        self.claim_output_dir()
        return self.checkpoints.save(self.checkpoint_state(), self.state.step, is_best)

    def load(self, path: str | Path) -> None:
        """Resume from ``path``, or with ``"auto"`` from the newest checkpoint of the output folder that
        verifies (none there: a fresh start)."""
        if str(path) == "auto":
            found = self.checkpoints.load_latest(self.device, say=self.say)
            if found is None:
                return
            path, ckpt = found
        else:
            ckpt = self.checkpoints.load(path, self.device)
        require_training_checkpoint(ckpt, path, ("model", "config", "optimizer", "scheduler", "run", "rng"))
        check_model_matches(ckpt, self.cfg.model.name, path)
        try:
            self.model.load_state_dict(ckpt["model"], strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{path} does not match this model: {str(e).splitlines()[1:3]}") from e
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            if ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
            self.state = RunState(**ckpt["run"])
            set_rng_state(ckpt["rng"])
        except (ValueError, TypeError, KeyError, RuntimeError) as e:  # a state saved by another optimizer set-up
            raise CheckpointError(f"{path}: cannot restore the training state ({type(e).__name__}: "
                                  f"{(str(e).splitlines() or [''])[0][:200]}); start a new run from its weights "
                                  f"instead (tools/convert_to_dense.py) or use a checkpoint of this config") from e
        self.resumed_from = Path(path)
        self.checkpoints.last_good = Path(path)

    # ---- one batch -----------------------------------------------------------------------------
    def loader(self, epoch: int, start_batch: int) -> DataLoader:
        cfg = self.cfg
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
        progress = self.state.step / max(1, self.total_steps)
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
        """Average the window's loss over processes, check it, clip, step. Returns the log record
        (``None`` when no micro-batch of the window had images)."""
        cfg, st = self.cfg, self.state
        if window.batches and self.dist.enabled and not window.synced:
            distributed.average_gradients(self.model.parameters())
        totals = torch.tensor([float(window.loss_sum), window.batches, window.images], dtype=torch.float64,
                              device=self.device)
        totals = distributed.all_reduce_sum(totals)
        loss_sum, batches, images = totals.tolist()
        lr = self.optimizer.param_groups[0]["lr"]
        record = None
        if batches:
            loss = loss_sum / batches
            self.scaler.unscale_(self.optimizer)
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            total_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
            grad_norm = float(total_norm)
            # with fp16 loss scaling, infinite gradients are routine: the scaler skips that step itself
            finite = math.isfinite(loss) and (self.scaler.is_enabled() or math.isfinite(grad_norm))
            record = {"step": st.step + 1, "epoch": st.epoch, "loss": loss if finite else None, "lr": lr,
                      "grad_norm": grad_norm if math.isfinite(grad_norm) else None}
            if finite:
                if cfg.train.clip_grad > 0:
                    torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), cfg.train.clip_grad, total_norm)
                scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
                self.scaler.step(self.optimizer)
                self._check_finite_weights(lr)
            elif st.skipped_steps < cfg.train.skip_nonfinite:
                st.skipped_steps += 1
                record["skipped"] = f"non-finite loss {loss} (skip {st.skipped_steps} of {cfg.train.skip_nonfinite})"
            else:
                kept = self._kept()
                allowed = (f"; {st.skipped_steps} non-finite step(s) were already skipped (train.skip_nonfinite="
                           f"{cfg.train.skip_nonfinite})" if cfg.train.skip_nonfinite else "")
                raise TrainingError(
                    f"non-finite loss {loss} (grad norm {grad_norm}) at step {st.step + 1} (epoch {st.epoch}); "
                    f"training stopped and {kept}{allowed}. Lower optim.base_lr, set train.clip_grad, check the data, "
                    f"or skip such steps with train.skip_nonfinite=K")
            self.scaler.update()
            if finite and scale is not None and self.scaler.get_scale() < scale:
                record["skipped"] = f"fp16 gradient overflow; loss scale lowered to {self.scaler.get_scale():g}"
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # expected when this step was skipped (non-finite loss, fp16 overflow): no optimizer.step() ran
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            self.scheduler.step()
        st.step += 1
        if record is not None:
            record["images"] = int(images)
        return record

    def _kept(self) -> str:
        last = self.checkpoints.last_good  # written by this run (finite weights) or resumed from
        return f"the last good checkpoint {str(last)!r} is kept" if last else "no checkpoint was written yet"

    def _check_finite_weights(self, lr: float) -> None:
        """A finite loss and gradient can still give non-finite weights (a huge learning rate, an Adam
        moment overflow): stop at that step, before they reach a checkpoint."""
        finite = torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()
        if not bool(finite):
            raise TrainingError(
                f"the update of step {self.state.step + 1} (epoch {self.state.epoch}, lr {lr:.3g}) made weights "
                f"non-finite; training stopped and {self._kept()}. Lower optim.base_lr or set train.clip_grad")

    def _data_name(self) -> str:
        return f"data folder {self.cfg.data.path!r}" if self.cfg.data.path else "the bundled photos"

    # ---- the run -------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, st = self.cfg, self.state
        main = self.dist.is_main
        log = RunLog(self.out_dir / "log.jsonl")
        if self.checkpoints.record is None:  # every process: all refuse another run's folder together
            self.checkpoints.check_can_start(self.resumed_from is not None, self.overwrite)
        if main:
            self.claim_output_dir()
            remove_stale_temp_files(self.out_dir)
            log.start(st.step)  # one record per step: drop what a killed run logged after its checkpoint
        writer = tensorboard_writer(self.out_dir / "tensorboard") if main and cfg.train.tensorboard else None
        history = []
        self.train_model.train()
        stop = bool(cfg.train.max_steps) and st.step >= cfg.train.max_steps
        while st.epoch < cfg.train.epochs and not stop:
            epoch_losses, unreadable, trained_windows, windows = [], 0, 0, 0
            bar = tqdm(total=self.batches_per_epoch, initial=st.batch_in_epoch, disable=not self.show_progress,
                       desc=f"epoch {st.epoch}", dynamic_ncols=True)
            window, t0 = _Window(), time.perf_counter()
            for images, seeds, n_bad in self.loader(st.epoch, st.batch_in_epoch):
                unreadable += n_bad
                last_of_window = (st.batch_in_epoch + 1) % cfg.train.accum_steps == 0
                if self._all_ranks_have_images(images):
                    images = images.to(self.device, non_blocking=True)
                    batch_id = st.epoch * self.batches_per_epoch + st.batch_in_epoch
                    loss, visible = self.train_step(images, seeds, batch_id, sync=last_of_window)
                    window.loss_sum += loss
                    window.batches += 1
                    window.images += images.shape[0]
                    window.synced, window.last = last_of_window, (images, visible)
                st.batch_in_epoch += 1
                bar.update(1)
                if not last_of_window:
                    continue
                record = self.optimizer_step(window)
                windows += 1
                if record is not None:
                    trained_windows += 1
                    record["images_per_s"] = record.pop("images") / max(time.perf_counter() - t0, 1e-9)
                    history.append(record)
                    if record["loss"] is not None:
                        epoch_losses.append(record["loss"])
                    if main:
                        self._log(record, log, writer, bar)
                        if cfg.train.vis_every and st.step % cfg.train.vis_every == 0 and window.last is not None:
                            self.visualize(*window.last, self.out_dir / "vis" / f"step-{st.step:07d}.png", writer)
                window, t0 = _Window(), time.perf_counter()
                if cfg.train.max_steps and st.step >= cfg.train.max_steps:
                    stop = True
                    break
            bar.close()
            if self.dist.enabled:
                unreadable = int(distributed.all_reduce_sum(torch.tensor([unreadable], device=self.device)))
            if unreadable and main:
                print(f"epoch {st.epoch}: skipped {unreadable} unreadable image(s)")
            if windows and not trained_windows:  # every process saw the same totals (all-reduced)
                raise DataError(
                    f"epoch {st.epoch}: not one readable image in {self._data_name()} ({unreadable} unreadable "
                    f"image(s) skipped over {windows} step(s)); training stopped and {self._kept()}. Check the "
                    f"files (permissions, format, size) and resume with --resume auto")
            if not stop:
                st.epoch, st.batch_in_epoch = st.epoch + 1, 0
            if not distributed.replicas_agree(self.model.parameters()):
                raise TrainingError(f"the processes' parameters differ at step {st.step}; this is a bug, please "
                                    f"report it")
            mean = sum(epoch_losses) / len(epoch_losses) if epoch_losses else float("inf")
            is_best = mean < st.best_loss
            st.best_loss = min(st.best_loss, mean)
            if main and (stop or st.epoch % cfg.train.save_every_epochs == 0 or st.epoch == cfg.train.epochs):
                self.last_checkpoint = self.save(is_best)
        if writer is not None:
            writer.close()
        if self.dist.enabled:
            torch.distributed.barrier()  # rank 0 has finished writing before any process leaves
        return {"history": history, "checkpoint": self.last_checkpoint, "state": st}

    def _log(self, record: dict, log: RunLog, writer, bar) -> None:
        log.write(record)
        if writer is not None:
            for key in ("loss", "lr", "grad_norm", "images_per_s"):
                if record.get(key) is not None:
                    writer.add_scalar(f"train/{key}", record[key], record["step"])
        loss = f"{record['loss']:.4f}" if record["loss"] is not None else "skipped"
        bar.set_postfix(loss=loss, lr=f"{record['lr']:.2e}", img_s=f"{record['images_per_s']:.1f}")

    def visualize(self, images: torch.Tensor, visible: torch.Tensor, path: Path, writer=None) -> Path:
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
        if writer is not None:
            import numpy as np

            writer.add_image("reconstruction", np.asarray(grid), self.state.step, dataformats="HWC")
        return path


def tensorboard_writer(folder: Path):
    """A SummaryWriter when the tensorboard package is installed, else None (logging goes to log.jsonl)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))


def config_of_checkpoint(path: str | Path) -> PretrainConfig:
    return config_from_dict(load_checkpoint(path)["config"])
