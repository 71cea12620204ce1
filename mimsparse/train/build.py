"""``build_run(cfg)``: what a pretraining run is made of, checked and wired in one place (as MAE's
main_pretrain.py): config checks, the run folder's hold, data, model (DDP, torch.compile), optimizer,
schedule, scaler, checkpoint manager, logger, resume and the dense start (``model.init``). The parts go
to :class:`mimsparse.train.engine.Trainer`, which trains them and imports nothing from here."""
from __future__ import annotations

import dataclasses
import sys
import warnings
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from mimsparse.backends import Backend, get_backend
from mimsparse.config import PretrainConfig
from mimsparse.errors import ConfigError, DataError, TrainingError
from mimsparse.evaluate.datasets import is_builtin, load_labelled
from mimsparse.masking import check_image_size
from mimsparse.models.build import build_fcmae
from mimsparse.train import distributed
from mimsparse.train.checkpoint_manager import CheckpointManager, check_free_space, checkpoint_size_estimate
from mimsparse.train.compile import check_compile_mode, compile_model
from mimsparse.train.data import FileSource, SeededImages, bundled_photo_paths, list_images, pretrain_transform
from mimsparse.train.engine import Trainer
from mimsparse.train.logger import RunLogger
from mimsparse.train.optim import GradientStep, lr_scheduler, param_groups, warmup_step_count
from mimsparse.train.precision import check_amp
from mimsparse.train.run_folder import hold
from mimsparse.train.run_state import RunParts
from mimsparse.train.shards import ShardImages, is_shard_spec
from mimsparse.train.stop_signal import StopSignal


def check_train_config(cfg: PretrainConfig) -> None:
    """Values the dataclass types cannot rule out, refused by key before anything is built."""
    ratio = cfg.mask.ratio
    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"mask.ratio must be in (0, 1) for pretraining (the loss is over the masked patches "
                          f"and some must stay visible), got {ratio}")
    minimum = {"train.batch_size": (cfg.train.batch_size, 1), "train.accum_steps": (cfg.train.accum_steps, 1),
               "train.epochs": (cfg.train.epochs, 1), "train.save_every_epochs": (cfg.train.save_every_epochs, 1),
               "data.repeat": (cfg.data.repeat, 1), "data.num_workers": (cfg.data.num_workers, 0),
               "train.keep_last": (cfg.train.keep_last, 0),
               "train.save_every_steps": (cfg.train.save_every_steps, 0),
               "train.save_every_minutes": (cfg.train.save_every_minutes, 0.0), "train.max_steps": (cfg.train.max_steps, 0),
               "train.skip_nonfinite": (cfg.train.skip_nonfinite, 0), "train.vis_every": (cfg.train.vis_every, 0),
               "train.clip_grad": (cfg.train.clip_grad, 0.0), "train.log_every": (cfg.train.log_every, 1),
               "data.shuffle_buffer": (cfg.data.shuffle_buffer, 1)}
    for key, (value, low) in minimum.items():
        if value < low:
            raise ConfigError(f"config key {key!r} must be >= {low}, got {value}")
    if not 0.0 < cfg.data.min_scale <= 1.0:
        raise ConfigError(f"config key 'data.min_scale' must be in (0, 1], got {cfg.data.min_scale}")
    cfg.data.size_hw  # noqa: B018 (N or HxW, refused by key otherwise)


def pretrain_source(cfg: PretrainConfig):
    """data.path: "" = the bundled photos, a built-in dataset name (its training images), or a folder."""
    if not cfg.data.path:
        return FileSource(bundled_photo_paths())
    if is_builtin(cfg.data.path):
        return load_labelled(cfg.data.path, "train")
    return FileSource(list_images(cfg.data.path))


def build_dataset(cfg: PretrainConfig, world_size: int) -> tuple[SeededImages | ShardImages, int]:
    """(dataset, optimizer steps per epoch); an epoch is cut to whole optimizer steps of every process."""
    transform = pretrain_transform(cfg.data.size_hw, cfg.data.min_scale)
    if is_shard_spec(cfg.data.path):
        dataset = ShardImages(cfg.data.path, transform, cfg.data.shuffle_buffer)
        dataset.check_split(world_size, cfg.data.num_workers)
    else:
        dataset = SeededImages(pretrain_source(cfg), transform)
    per_step = cfg.train.batch_size * cfg.train.accum_steps * world_size
    steps_per_epoch = len(dataset) * cfg.data.repeat // per_step
    if steps_per_epoch == 0:
        raise DataError(f"{len(dataset)} images x data.repeat={cfg.data.repeat} is less than one optimizer step "
                        f"of {per_step} images (train.batch_size={cfg.train.batch_size} x train.accum_steps="
                        f"{cfg.train.accum_steps} x {world_size} process(es)); lower train.batch_size or raise "
                        f"data.repeat")
    return dataset, steps_per_epoch


def build_model(cfg: PretrainConfig, backend: Backend, device: torch.device, distributed: bool):
    """(the FCMAE model, the module every process runs: DDP-wrapped and/or compiled)."""
    torch.manual_seed(cfg.train.seed)  # the run's seed: the initial weights
    model = build_fcmae(cfg, backend).to(device)
    try:
        check_image_size(*cfg.data.size_hw, model.patch_size)
    except ValueError as e:
        raise ConfigError(f"data.img_size={cfg.data.img_size}: {e}") from None
    train_model = model
    if distributed:
        # Every parameter gets a gradient at every step (no find_unused_parameters). Backends that
        # compute in channels_last (dense) return some weight gradients in that layout; DDP then
        # copies them into its buckets and says so once per process: harmless, so not shown.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, compile_model(train_model, cfg.train.compile)


def start_from_dense(cfg: PretrainConfig, model: torch.nn.Module, resumed: bool,
                     run_record: dict | None) -> tuple[PretrainConfig, dict | None, str | None]:
    """``model.init``: at a fresh start, the encoder from those dense weights (strict; the decoder stays
    fresh). Returns (the config with the file's absolute path and SHA-256, the record for
    run.json, the line to print). A resumed run has its weights from its own checkpoint: the file is
    not read again (it may be gone); the run's record (``run_record``, its run.json) stays the truth."""
    from mimsparse.convert.dense_init import init_from_dense

    m = cfg.model
    if resumed:
        record = (run_record or {}).get("init")
        if record:
            model_cfg = dataclasses.replace(m, init=record["path"], init_sha256=record["sha256"])
            cfg = dataclasses.replace(cfg, model=model_cfg)
        line = None
        if m.init:
            started = f"; the run started from {record['path']}" if record else ""
            line = f"init: {m.init} not read: a resumed run has its weights from its checkpoint{started}"
        return cfg, record, line
    if not m.init:
        return cfg, None, None
    report = init_from_dense(model, m.init, m.name, m.init_sha256)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(m, init=report.path, init_sha256=report.sha256))
    return cfg, report.record(), report.line()


def build_optimization(cfg: PretrainConfig, model: torch.nn.Module, lr: float, steps_per_epoch: int,
                       total_steps: int, amp_dtype, device: torch.device):
    """AdamW (no decay on norms, biases, GRN, mask token), warm-up + cosine per step, and a loss
    scaler that only fp16 needs (a pass-through otherwise)."""
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=lr,
                                  betas=(cfg.optim.beta1, cfg.optim.beta2))
    scheduler = lr_scheduler(optimizer, lr, warmup_step_count(cfg, steps_per_epoch), total_steps, cfg.optim.min_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return optimizer, scheduler, scaler


def build_parts(cfg: PretrainConfig, backend: Backend, device: torch.device, amp_dtype, stop: StopSignal,
                folder, show_progress: bool, overwrite: bool) -> RunParts:
    """Data, model, optimization, checkpoint manager and logger of a checked config, in that order."""
    dist = distributed.current()
    dataset, steps_per_epoch = build_dataset(cfg, dist.world_size)
    model, train_model = build_model(cfg, backend, device, dist.enabled)
    lr = cfg.lr(dist.world_size)
    optimizer, scheduler, scaler = build_optimization(cfg, model, lr, steps_per_epoch,
                                                      steps_per_epoch * cfg.train.epochs, amp_dtype, device)
    out_dir = Path(cfg.train.output_dir)
    checkpoints = CheckpointManager(out_dir, cfg.train.keep_last)
    gradient_step = GradientStep(model, optimizer, scheduler, scaler, cfg.train.clip_grad, cfg.train.skip_nonfinite,
                                 checkpoints.kept)
    if dist.is_main:
        check_free_space(checkpoints.folder, checkpoint_size_estimate(model, optimizer))
    logger = RunLogger(out_dir, dist.is_main, show_progress, cfg.train.log_every,
                       cfg.train.tensorboard, cfg.to_dict() if cfg.train.wandb else None)
    return RunParts(cfg=cfg, dist=dist, device=device, backend=backend, overwrite=overwrite,
                    say=print if dist.is_main else (lambda *a, **k: None), amp_dtype=amp_dtype, stop=stop,
                    folder=folder, dataset=dataset, steps_per_epoch=steps_per_epoch, model=model,
                    train_model=train_model, lr=lr, optimizer=optimizer, gradient_step=gradient_step,
                    checkpoints=checkpoints, logger=logger)


class Pretrainer(Trainer):
    """A pretraining run built from its config: checks, the folder's hold, the parts (:func:`build_parts`),
    then the resume (``resume``: a path or "auto") and the dense start; ``run()`` trains it
    (:class:`~mimsparse.train.engine.Trainer`). Under ``torchrun`` the model is wrapped in DDP and rank 0
    alone holds the folder, logs and writes checkpoints."""

    def __init__(self, cfg: PretrainConfig, backend: Backend | str = "dense", device: str = "cpu",
                 resume: str | Path | None = None, show_progress: bool = True, overwrite: bool = False):
        dist = distributed.current()
        device = torch.device(device)
        backend = get_backend(backend) if isinstance(backend, str) else backend
        check_train_config(cfg)
        amp_dtype = check_amp(cfg.train.amp, backend, device)
        check_compile_mode(cfg.train.compile)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise TrainingError("--device cuda but CUDA is not available; use --device cpu")
        stop = StopSignal(cfg.train.stop_signals)
        # the main process holds the folder from here to the end of run() (see mimsparse.train.run_folder)
        folder = hold(Path(cfg.train.output_dir), _command(), dist.is_main, dist.enabled, device)
        try:
            super().__init__(build_parts(cfg, backend, device, amp_dtype, stop, folder, show_progress, overwrite))
            if resume:
                self.load(resume)
            resumed = self.resumed_from is not None
            self.cfg, self.init_record, line = start_from_dense(self.cfg, self.model, resumed,
                                                                self.checkpoints.read_record() if resumed else None)
            if line:
                self.say(line)
        except BaseException:
            if folder is not None:
                folder.abandon()
            raise


def _command() -> str:
    """Who holds a run folder, for the refusal a second process gets."""
    if not (sys.argv and sys.argv[0]):
        return "a library call"
    script = Path(sys.argv[0])
    return f"python -m {script.parent.name}" if script.name == "__main__.py" else script.name


def build_run(cfg: PretrainConfig, backend: Backend | str = "dense", device: str = "cpu",
              resume: str | Path | None = None, show_progress: bool = True, overwrite: bool = False) -> Pretrainer:
    """The run of ``cfg``, built and resumed from ``resume`` (a path or "auto") when given; ``run()``
    trains it."""
    return Pretrainer(cfg, backend, device, resume, show_progress, overwrite)
