"""Optimisation: AdamW's parameter groups, the lr schedule, and one gradient step with its policies."""
from __future__ import annotations

import math
import warnings
from typing import Callable

import torch

from mimsparse.errors import TrainingError


def param_groups(model: torch.nn.Module, weight_decay: float):
    """No weight decay on biases, norms, GRN and the mask token (as MAE/FCMAE)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith("mask_token") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """lr multiplier per iteration: linear warm-up, then half a cosine down to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def lr_scheduler(optimizer, lr: float, warmup_steps: int, total_steps: int, min_lr: float, done: int = 0,
                 offset: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up + cosine per step from peak ``lr``, positioned after ``done`` steps (a resume: the
    optimizer's lr is set for step ``done`` now, never left at what the checkpoint's schedule ended on).
    ``offset``: schedule steps (in this run's step size) that precede step 0 of the step counter's
    current scale (non-zero only when a resume changed the steps per epoch)."""
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
    min_ratio = min_lr / lr if lr > 0 else 0.0
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s + offset, warmup_steps, total_steps, min_ratio), last_epoch=done - 1)


def set_hyperparameters(optimizer, weight_decay: float, betas: tuple[float, float]) -> None:
    """Apply the config's AdamW settings to an optimizer whose state came from a checkpoint (its
    groups carry the values they were saved with): group 0 decays, group 1 does not (:func:`param_groups`)."""
    for group in optimizer.param_groups:
        group["betas"] = betas
    optimizer.param_groups[0]["weight_decay"] = weight_decay


class GradientStep:
    """One optimizer step from accumulated gradients: unscale (fp16), total gradient norm, clipping,
    the non-finite policy (skip up to ``skip_nonfinite`` steps without an update, else stop with the
    last good checkpoint named by ``kept()``), fp16 overflow, a check that the update left the weights
    finite, then zero_grad and the lr schedule. Gradients must already be averaged over processes."""

    def __init__(self, model: torch.nn.Module, optimizer, scheduler, scaler, clip_grad: float,
                 skip_nonfinite: int, kept: Callable[[], str]):
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.clip_grad, self.skip_nonfinite, self.kept = clip_grad, skip_nonfinite, kept

    def __call__(self, loss: float, state) -> dict:
        """``loss``: the step's mean loss; ``state``: the RunState (its ``step``, ``epoch`` and
        ``skipped_steps`` are read and advanced). Returns the step's log fields."""
        lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        total_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        grad_norm = float(total_norm)
        # with fp16 loss scaling, infinite gradients are routine: the scaler skips that step itself
        finite = math.isfinite(loss) and (self.scaler.is_enabled() or math.isfinite(grad_norm))
        record = {"step": state.step + 1, "epoch": state.epoch, "loss": loss if finite else None, "lr": lr,
                  "grad_norm": grad_norm if math.isfinite(grad_norm) else None}
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        if finite:
            if self.clip_grad > 0:
                torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), self.clip_grad, total_norm)
            self.scaler.step(self.optimizer)
            self._check_finite_weights(state, lr)
        elif state.skipped_steps < self.skip_nonfinite:
            state.skipped_steps += 1
            record["skipped"] = f"non-finite loss {loss} (skip {state.skipped_steps} of {self.skip_nonfinite})"
        else:
            self._stop(loss, grad_norm, state)
        self.scaler.update()
        if finite and scale is not None and self.scaler.get_scale() < scale:
            record["skipped"] = f"fp16 gradient overflow; loss scale lowered to {self.scaler.get_scale():g}"
        self.finish(state)
        return record

    def finish(self, state) -> None:
        """End the step without an update too (a window without a single image): the schedule moves on."""
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # expected when this step was skipped (non-finite loss, fp16 overflow): no optimizer.step() ran
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            self.scheduler.step()
        state.step += 1

    def _stop(self, loss: float, grad_norm: float, state) -> None:
        allowed = (f"; {state.skipped_steps} non-finite step(s) were already skipped (train.skip_nonfinite="
                   f"{self.skip_nonfinite})" if self.skip_nonfinite else "")
        raise TrainingError(
            f"non-finite loss {loss} (grad norm {grad_norm}) at step {state.step + 1} (epoch {state.epoch}); "
            f"training stopped and {self.kept()}{allowed}. Lower optim.base_lr, set train.clip_grad, check the data, "
            f"or skip such steps with train.skip_nonfinite=K")

    def _check_finite_weights(self, state, lr: float) -> None:
        """A finite loss and gradient can still give non-finite weights (a huge learning rate, an Adam
        moment overflow): stop at that step, before they reach a checkpoint."""
        finite = torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()
        if not bool(finite):
            raise TrainingError(
                f"the update of step {state.step + 1} (epoch {state.epoch}, lr {lr:.3g}) made weights "
                f"non-finite; training stopped and {self.kept()}. Lower optim.base_lr or set train.clip_grad")
