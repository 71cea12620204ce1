"""Pretraining loop: data -> mask -> model -> loss -> optimizer -> checkpoint."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from mimsparse.backends import Backend, get_backend
from mimsparse.build import build_fcmae
from mimsparse.checkpoint import (CheckpointError, check_model_matches, load_checkpoint, rng_state,
                                  save_checkpoint, set_rng_state, versions)
from mimsparse.config import PretrainConfig, config_from_dict
from mimsparse.data import (DataError, EpochSampler, ImageFiles, bundled_photo_paths, collate_skip_bad,
                            list_images, pretrain_transform)
from mimsparse.masking import check_image_size

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingError(RuntimeError):
    pass


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """lr multiplier per iteration: linear warm-up, then half a cosine down to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def step_seed(seed: int, batch_id: int) -> int:
    """Every random draw of a batch (mask, drop path) derives from (seed, batch): resume is exact."""
    return (seed * 1_000_003 + batch_id) % (2**63)


def param_groups(model: torch.nn.Module, weight_decay: float):
    """No weight decay on biases, norms, GRN and the mask token (as MAE/FCMAE)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith("mask_token") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class RunState:
    epoch: int = 0          # epoch in progress
    step: int = 0           # optimizer steps done
    batch_in_epoch: int = 0  # batches of the current epoch done
    best_loss: float = float("inf")


def image_paths(cfg: PretrainConfig):
    return list_images(cfg.data.path) if cfg.data.path else bundled_photo_paths()


class Pretrainer:
    """Holds the objects of one run; ``run()`` trains to the end (or ``train.max_steps``)."""

    def __init__(self, cfg: PretrainConfig, backend: Backend | str = "dense", device: str = "cpu",
                 resume: str | Path | None = None, show_progress: bool = True):
        self.cfg = cfg
        self.device = torch.device(device)
        self.backend = get_backend(backend) if isinstance(backend, str) else backend
        self.show_progress = show_progress
        self.out_dir = Path(cfg.train.output_dir)
        self.amp_dtype = self._check_amp()
        check_image_size(cfg.data.img_size, cfg.data.img_size, 32)

        self.paths = image_paths(cfg)
        self.dataset = ImageFiles(self.paths, pretrain_transform(cfg.data.img_size, cfg.data.min_scale))
        self.batches_per_epoch = len(self.paths) * cfg.data.repeat // cfg.train.batch_size
        if self.batches_per_epoch == 0:
            raise DataError(f"{len(self.paths)} images x data.repeat={cfg.data.repeat} is less than one batch of "
                            f"{cfg.train.batch_size}; lower train.batch_size or raise data.repeat")
        self.steps_per_epoch = self.batches_per_epoch // cfg.train.accum_steps
        self.total_steps = self.steps_per_epoch * cfg.train.epochs

        torch.manual_seed(cfg.train.seed)
        self.model = build_fcmae(cfg, self.backend).to(self.device)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.optim.weight_decay), lr=cfg.lr(),
                                           betas=(cfg.optim.beta1, cfg.optim.beta2))
        warmup = max(1, round(cfg.optim.warmup_epochs * self.steps_per_epoch))
        min_ratio = cfg.optim.min_lr / cfg.lr() if cfg.lr() > 0 else 0.0
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, warmup, self.total_steps, min_ratio))
        self.state = RunState()
        if resume:
            self.load(resume)

    def _check_amp(self):
        dtype = AMP_DTYPES.get(self.cfg.train.amp, "bad")
        if dtype == "bad":
            raise TrainingError(f"train.amp must be one of {', '.join(AMP_DTYPES)}, got {self.cfg.train.amp!r}")
        if dtype is not None:
            if self.device.type != "cuda":
                raise TrainingError("mixed precision (train.amp) is for CUDA; on CPU train in fp32 with train.amp=none")
            self.backend.check_dtype(dtype, self.device)
        return dtype

    # ---- checkpoints ---------------------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "run": vars(self.state).copy(),
            "config": self.cfg.to_dict(),
            "backend": self.backend.name,  # informative only: any backend can load this
            "versions": versions(),
            "rng": rng_state(),
        }

    def save(self, is_best: bool = False) -> Path:
        path = save_checkpoint(self.checkpoint_state(), self.out_dir / f"checkpoint-{self.state.step:07d}.pth")
        if is_best:
            save_checkpoint(self.checkpoint_state(), self.out_dir / "checkpoint-best.pth")
        old = sorted(self.out_dir.glob("checkpoint-[0-9]*.pth"))[:-self.cfg.train.keep_last or None]
        for p in old if self.cfg.train.keep_last > 0 else []:
            p.unlink()
        return path

    def load(self, path: str | Path) -> None:
        if str(path) == "auto":
            found = latest_checkpoint(self.out_dir)
            if found is None:
                return
            path = found
        ckpt = load_checkpoint(path, self.device)
        check_model_matches(ckpt, self.cfg.model.name, path)
        try:
            self.model.load_state_dict(ckpt["model"], strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{path} does not match this model: {str(e).splitlines()[1:3]}") from e
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.state = RunState(**ckpt["run"])
        set_rng_state(ckpt["rng"])
        self.resumed_from = Path(path)

    # ---- training ------------------------------------------------------------------------------
    def loader(self, epoch: int, start_batch: int) -> DataLoader:
        cfg = self.cfg
        sampler = EpochSampler(len(self.paths), cfg.train.seed, epoch, cfg.data.repeat,
                               start=start_batch * cfg.train.batch_size)
        return DataLoader(self.dataset, batch_size=cfg.train.batch_size, sampler=sampler, drop_last=True,
                          num_workers=cfg.data.num_workers, collate_fn=collate_skip_bad,
                          persistent_workers=False)

    def train_step(self, images: torch.Tensor, batch_id: int) -> float:
        """Forward + backward of one batch; ``batch_id`` counts batches since the run began."""
        cfg = self.cfg
        g = torch.Generator().manual_seed(step_seed(cfg.train.seed, batch_id))
        torch.manual_seed(step_seed(cfg.train.seed, batch_id))  # drop path
        visible = self.model.make_mask(images, g, progress=batch_id / max(1, self.total_steps * cfg.train.accum_steps))
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            loss, _, _ = self.model(images, visible)
        (loss / cfg.train.accum_steps).backward()
        return loss.item()

    def run(self) -> dict:
        cfg, st = self.cfg, self.state
        self.out_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.out_dir / "log.jsonl"
        history = []
        self.model.train()
        stop = False
        while st.epoch < cfg.train.epochs and not stop:
            epoch_losses, skipped = [], 0
            bar = tqdm(total=self.batches_per_epoch, initial=st.batch_in_epoch, disable=not self.show_progress,
                       desc=f"epoch {st.epoch}", dynamic_ncols=True)
            t0 = time.perf_counter()
            for images, n_bad in self.loader(st.epoch, st.batch_in_epoch):
                skipped += n_bad
                if images.numel() == 0:
                    continue
                images = images.to(self.device, non_blocking=True)
                loss = self.train_step(images, st.epoch * self.batches_per_epoch + st.batch_in_epoch)
                if not math.isfinite(loss):
                    raise TrainingError(f"non-finite loss {loss} at step {st.step} (epoch {st.epoch}); the last good "
                                        f"checkpoint in {self.out_dir} is kept — lower optim.base_lr or check the data")
                st.batch_in_epoch += 1
                if st.batch_in_epoch % cfg.train.accum_steps == 0:
                    if cfg.train.clip_grad > 0:
                        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.clip_grad)
                    lr = self.optimizer.param_groups[0]["lr"]
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.scheduler.step()
                    st.step += 1
                    elapsed = time.perf_counter() - t0
                    record = {"step": st.step, "epoch": st.epoch, "loss": loss, "lr": lr,
                              "images_per_s": images.shape[0] / max(elapsed, 1e-9)}
                    t0 = time.perf_counter()
                    history.append(record)
                    epoch_losses.append(loss)
                    with open(log_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{record['images_per_s']:.1f}")
                    if cfg.train.max_steps and st.step >= cfg.train.max_steps:
                        stop = True
                bar.update(1)
                if stop:
                    break
            bar.close()
            if skipped:
                print(f"epoch {st.epoch}: skipped {skipped} unreadable image(s)")
            if not stop:
                st.epoch, st.batch_in_epoch = st.epoch + 1, 0
            mean = sum(epoch_losses) / len(epoch_losses) if epoch_losses else float("inf")
            is_best = mean < st.best_loss
            st.best_loss = min(st.best_loss, mean)
            if stop or st.epoch % cfg.train.save_every_epochs == 0 or st.epoch == cfg.train.epochs:
                self.last_checkpoint = self.save(is_best)
        return {"history": history, "checkpoint": getattr(self, "last_checkpoint", None), "state": st}


def latest_checkpoint(folder: str | Path) -> Path | None:
    found = sorted(Path(folder).glob("checkpoint-[0-9]*.pth"))
    return found[-1] if found else None


def config_of_checkpoint(path: str | Path) -> PretrainConfig:
    return config_from_dict(load_checkpoint(path)["config"])
