"""One finetuning epoch and the evaluation (the loop of MAE's ``engine_finetune.py``): gradient
accumulation, mixed precision, gradient clipping, DDP. The run around it (data, model, files, resume)
is :mod:`mimsparse.evaluate.finetune`."""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from mimsparse.evaluate.loaders import top1_correct
from mimsparse.train import distributed
from mimsparse.train.data import DataError
from mimsparse.train.logger import Pace
from mimsparse.train.save_interval import SaveInterval


@dataclass(frozen=True)
class StepOptions:
    """How micro-batches become an optimizer step."""
    accum: int = 1                    # micro-batches per optimizer step (--accum-iter)
    amp: torch.dtype | None = None    # autocast dtype (--amp)
    clip_grad: float = 0.0            # max gradient norm, 0 = none (--clip-grad)
    max_steps: int = 0                # stop at this global step, 0 = none (--max-steps)


@dataclass
class PeriodicSave(SaveInterval):
    """The interval, and ``write(step, part)`` that saves last.pth within the epoch. Every process calls
    it together (it gathers their RNG states), so the minutes are rank 0's clock, agreed in the step's
    all-reduce."""
    write: Callable[[int, dict], None] | None = None

    def due(self, step: int, time_is_up: bool | None = None) -> bool:
        return self.write is not None and super().due(step, time_is_up)

    def save(self, step: int, part: dict) -> None:
        self.write(step, part)
        self.saved()


def max_lr(optimizer) -> float:
    """The head's lr (scale 1), the one the schedule describes."""
    return max(group["lr"] for group in optimizer.param_groups)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def train_one_epoch(run, loader, step: int, options: StepOptions = StepOptions(), desc: str = "",
                    show_progress: bool = True, stop=None, part: dict | None = None, log_every: int = 0,
                    pace: Pace | None = None, periodic: PeriodicSave | None = None) -> dict:
    """Trains ``run.train_model`` over ``loader`` from global step ``step``: every ``options.accum``
    micro-batches make one optimizer step (the gradients of the others stay local under DDP). Stops at
    ``options.max_steps``, or after the step in progress when ``stop`` (a
    :class:`~mimsparse.train.stop_signal.StopSignal`) was signalled. ``part``: the sums of the part of
    this epoch a stopped run did. Without the bar, a plain line every ``log_every`` steps, with
    ``pace``'s ETA; ``periodic`` saves within the epoch (not after its last batch: the caller saves
    the whole epoch). Returns {"step": the next step, "loss": mean training loss, "lr": last lr, "images",
    "unreadable", "batches_done" (loader batches of the epoch done, ``part``'s included), "stopped"
    (the signal's name or None), "part"}."""
    from mimsparse.errors import TrainingError

    model, optimizer, device = run.train_model, run.optimizer, run.device
    model.train()
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    part = part or {"loss_sum": 0.0, "batches": 0, "images": 0, "unreadable": 0, "batches_done": 0}
    loss_sum, batches, images_seen, unreadable = part["loss_sum"], part["batches"], part["images"], part["unreadable"]
    done, stopped, lr = part["batches_done"], None, max_lr(optimizer)
    bar = tqdm(loader, desc=desc, disable=not show_progress, dynamic_ncols=True, leave=False)
    pace = pace or Pace(0)
    since, images_since = time.perf_counter(), 0  # for the plain line's images/s
    periodic = periodic or PeriodicSave()

    def part_done() -> dict:  # the sums so far: what last.pth keeps of an unfinished epoch
        return {"loss_sum": loss_sum, "batches": batches, "images": images_seen, "unreadable": unreadable,
                "batches_done": done}

    batches_in_epoch = done + len(loader) if hasattr(loader, "__len__") else None
    # loss sum, images, micro-batches; and rank 0's "time for a periodic save" (one all-reduce agrees on it)
    micro, window = 0, torch.zeros(4, dtype=torch.float64, device=device)
    for images, labels, n_bad in bar:
        unreadable, done = unreadable + n_bad, done + 1
        if options.max_steps and step >= options.max_steps:
            break
        if micro == 0:
            run.scheduler.step_update(step)
            lr = max_lr(optimizer)
            optimizer.zero_grad(set_to_none=True)
        micro += 1
        if run.mixup is not None and len(images) % 2:
            images, labels = images[:-1], labels[:-1]  # timm's Mixup pairs samples; a file was unreadable
        if len(images):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if run.mixup is not None:
                images, labels = run.mixup(images, labels)  # labels become soft targets [B, num_classes]
            with _autocast(device, options.amp):
                loss = run.criterion(model(images), labels)
            # DDP exchanges the gradients at the window's last micro-batch only
            with model.no_sync() if ddp and micro < options.accum else contextlib.nullcontext():
                run.scaler.scale(loss / options.accum).backward()
            window[0] += loss.detach().double()  # no host sync per micro-batch
            window[1] += len(images)
            window[2] += 1
        if micro < options.accum:
            continue
        # the job's mean loss: every process logs it, and a non-finite one stops them all at this step
        if distributed.current().is_main and periodic.time_is_up():
            window[3] = 1.0
        job = distributed.all_reduce_sum(window)
        micro, window = 0, torch.zeros_like(window)
        if job[2] == 0:
            continue  # every image of the window was unreadable, on every process: no step
        job_loss, job_images = job[0].item() / job[2].item(), int(job[1].item())
        if not math.isfinite(job_loss):
            raise TrainingError(f"training loss is {job_loss} at step {step}; lower --lr / --blr")
        if options.clip_grad > 0:
            run.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), options.clip_grad)
        run.scaler.step(optimizer)
        run.scaler.update()
        if run.ema is not None:
            run.ema.update(run.model)
        step += 1
        loss_sum, batches, images_seen = loss_sum + job_loss, batches + 1, images_seen + job_images
        bar.set_postfix(loss=f"{job_loss:.4f}", lr=f"{lr:.2e}")
        images_since += job_images
        if not show_progress and log_every and step % log_every == 0:
            now = time.perf_counter()
            print(f"step {step} | {desc} | loss {job_loss:.4f} | lr {lr:.2e} | "
                  f"{images_since / max(now - since, 1e-9):.1f} img/s{pace.describe(step)}", flush=True)
            since, images_since = now, 0
        pace.step_done(step)
        if stop is not None and stop.requested():
            stopped = stop.reason()
            break
        if done != batches_in_epoch and periodic.due(step, job[3].item() > 0):
            periodic.save(step, part_done())
    bar.close()
    return {"step": step, "loss": loss_sum / batches if batches else None, "lr": lr, "images": images_seen,
            "unreadable": unreadable, "batches_done": done, "stopped": stopped, "part": part_done()}


@torch.no_grad()
def evaluate(model, loader, device, amp: torch.dtype | None = None) -> dict:
    """{"top1": correct / total in [0, 1], "loss": mean cross-entropy, "correct", "total"} over ``loader``
    (under torchrun: over every process's loader, each holding its share of the images)."""
    device = torch.device(device)
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    for images, labels, _ in loader:
        if len(images) == 0:
            continue
        with _autocast(device, amp):
            logits = model(images.to(device))
        labels = labels.to(device)
        loss_sum += torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum").item()
        correct += top1_correct(logits, labels)
        total += len(labels)
    sums = distributed.all_reduce_sum(torch.tensor([correct, total, loss_sum], dtype=torch.float64, device=device))
    correct, total, loss_sum = int(sums[0]), int(sums[1]), float(sums[2])  # each process evaluated its share
    if total == 0:
        raise DataError("no readable test image to evaluate on")
    return {"top1": correct / total, "loss": loss_sum / total, "correct": correct, "total": total}
