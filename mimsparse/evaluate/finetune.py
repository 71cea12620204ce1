"""Supervised finetuning of a dense timm classifier: the ConvNeXt V2 / MAE finetune recipe scaled down.

The weights it starts from (``--checkpoint``): :mod:`mimsparse.evaluate.initial_weights`. Its
epoch: :mod:`mimsparse.evaluate.finetune_engine`. Its last.pth: :mod:`mimsparse.evaluate.finetune_checkpoint`.

Recipe: AdamW with layer-wise lr decay (timm ``create_optimizer_v2``: depth from the model's
``group_matcher``, no weight decay on norms and biases), per-step linear warm-up then cosine
(timm ``CosineLRScheduler``, which multiplies each group's lr by its ``lr_scale``), label smoothing,
drop path, optional mixup / cutmix, fresh head scaled by ``head_init_scale`` (ConvNeXt V2: 0.001).
Top-1 on the test split after every epoch; the best model is saved as a plain timm state dict.

A run (:func:`main`, which holds the output folder): ``_setup`` builds data, model and optimisation,
``_resume`` restores last.pth (``--resume``), ``_train_epochs`` trains, evaluates and saves each epoch,
``_report`` writes results.json; ``evaluate_only`` is ``--eval``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mimsparse.convert.export import load_lines, save_weights
from mimsparse.evaluate.finetune_checkpoint import (load_resume_state, resume_path, save_resume_state, set_rng_state,
                                                    weights_of)
from mimsparse.evaluate.initial_weights import build_model
from mimsparse.train.checkpoint import CheckpointError, write_text_atomic
from mimsparse.evaluate.finetune_engine import PeriodicSave, StepOptions, evaluate, max_lr, train_one_epoch
from mimsparse.evaluate.loaders import (check_fraction, check_img_size, eval_loader, limit_subset, stratified_subset,
                                        train_loader)
from mimsparse.train.data import DataError
from mimsparse.cli import interactive
from mimsparse.errors import ConfigError, OutputError
from mimsparse.train import distributed
from mimsparse.train.logger import Pace
from mimsparse.train.precision import AMP_DTYPES, autocast_dtype  # the rule train.amp follows
from mimsparse.train.run_log import json_safe
from mimsparse.evaluate.datasets import LabelledImages, has_test_split, load_labelled

EVAL_SUBSET_SEED = 0  # --eval-limit keeps the same test images whatever --seed, so runs stay comparable


# ---- command line ----------------------------------------------------------------------------------
def weights_and_data_args() -> argparse.ArgumentParser:
    """The options tools/finetune.py and tools/linear_probe.py share (weights, data, device), as a
    parent parser (``argparse.ArgumentParser(parents=[...])``)."""
    p = argparse.ArgumentParser(add_help=False)
    from mimsparse.cli_args import add_checkpoint, add_img_size

    add_checkpoint(p, "pretraining checkpoint, timm state dict (.safetensors or .pth), timm or Hugging Face "
                      "transformers model folder, or 'random'")
    p.add_argument("--data", required=True, help="ImageFolder, or fashion-mnist | lfw-subset | foolbox-imagenet")
    p.add_argument("--model", default=None, help="timm model name, e.g. convnextv2_atto (default: the one a "
                   "pretraining checkpoint or an export's header names; required for random and a bare state dict)")
    add_img_size(p, 224, "input size, a multiple of 32; smaller images are resized up (default %(default)s)",
                 type=int)
    p.add_argument("--val-fraction", type=float, default=0.2, help="a folder without train/ and test/: hold out "
                   "this fraction of every class (seeded, the same whatever --seed) to evaluate on (default "
                   "%(default)s)")
    p.add_argument("--eval-limit", type=int, default=0, help="evaluate on about N test images, stratified, the "
                   "same whatever --seed (default: all)")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (none either when the output is not "
                   "a terminal)")
    return p


# ---- optimisation ----------------------------------------------------------------------------------
def create_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, layer_decay: float):
    """AdamW; every group carries ``lr_scale`` = layer_decay ** (depth of the head - depth of the group)."""
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(model, "adamw", lr=lr, weight_decay=weight_decay, layer_decay=layer_decay)


def create_scheduler(optimizer, total_steps: int, warmup_steps: int, min_lr: float):
    """Per-step schedule (call ``step_update(step)`` before step ``step``): lr rises linearly from 0 over
    ``warmup_steps``, then falls along half a cosine to ``min_lr`` at ``total_steps``; timm's scheduler
    applies each group's ``lr_scale`` (torch's LambdaLR would ignore it)."""
    from timm.scheduler import CosineLRScheduler

    # t_initial >= 2: the same lrs as 1 (a single post-warm-up step runs at the peak either way) without
    # timm's warning that a one-step cosine has no effect
    return CosineLRScheduler(optimizer, t_initial=max(2, total_steps - warmup_steps), lr_min=min_lr,
                             warmup_t=warmup_steps, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)


def warmup_steps(warmup_epochs: float, steps_per_epoch: int, total_steps: int, log=print) -> int:
    """``warmup_epochs`` in steps, clamped to a tenth of the run when it would last the whole run (the
    lr would never reach its peak nor decay), with a line saying so."""
    steps = round(warmup_epochs * steps_per_epoch)
    if steps >= total_steps and total_steps > 1:
        clamped = total_steps // 10
        log(f"warning: --warmup-epochs {warmup_epochs:g} ({steps} steps) covers the whole run of {total_steps} steps; "
            f"warm-up clamped to {clamped} steps (a tenth of the run)")
        return clamped
    return steps


# ---- run -------------------------------------------------------------------------------------------
def write_json(path: Path, obj) -> None:
    """Written to a temporary file and renamed: a reader never sees half a file."""
    text = json.dumps(json_safe(obj), indent=2, default=str, allow_nan=False) + "\n"
    _output(path, lambda: write_text_atomic(path, text))


def append_jsonl(path: Path, record: dict) -> None:
    def append():
        with open(path, "a") as f:
            f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")  # NaN/inf -> null: valid JSON

    _output(path, append)


def _output(path: Path, write) -> None:
    """A small output file of a finetune or probe run; a failed write is one line saying what is kept."""
    try:
        write()
    except OSError as e:
        raise OutputError(f"cannot write {str(path)!r} ({e.strerror or e}); the other files in {str(path.parent)!r} "
                          f"are kept. Free disk space, then run again (finetuning: --resume auto)") from e


def peak_lr(lr: float | None, blr: float, batch_size: int) -> float:
    """``lr``, or ``blr`` x batch size / 256 (the linear scaling rule of MAE and ConvNeXt V2)."""
    return lr if lr is not None else blr * batch_size / 256


def seed_everything(seed: int) -> None:
    """torch drives drop path, NumPy timm's mixup / cutmix draws, Python's ``random`` is seeded for completeness."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def check_args(args) -> None:
    """Values argparse's types cannot rule out, refused before anything is loaded."""
    check_img_size(args.img_size)
    check_fraction(args.label_fraction)
    for flag in ("epochs", "batch_size"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if peak_lr(args.lr, args.blr, args.batch_size) <= 0:
        raise ConfigError("the learning rate must be positive (--lr or --blr)")
    if not 0 <= args.drop_path < 1 or not 0 <= args.smoothing < 1:
        raise ConfigError("--drop-path and --smoothing must be in [0, 1)")
    if getattr(args, "model_ema", False) and not 0 <= args.model_ema_decay < 1:
        raise ConfigError(f"--model-ema-decay must be in [0, 1), got {args.model_ema_decay}")
    if getattr(args, "accum_iter", 1) < 1:
        raise ConfigError(f"--accum-iter must be at least 1, got {args.accum_iter}")
    for flag in ("save_every_steps", "save_every_minutes"):
        value = getattr(args, flag, 0)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"--{flag.replace('_', '-')} must be 0 (off) or more, got {value}")
    autocast_dtype(getattr(args, "amp", "none"), args.device, "--amp")
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        raise ConfigError(f"mixup / cutmix pair the samples of a batch: --batch-size must be even, "
                         f"got {args.batch_size}")


def held_out_split(data: LabelledImages, fraction: float) -> tuple[LabelledImages, LabelledImages]:
    """(train, validation): ``fraction`` of every class held out (at least one image each), drawn from
    a fixed seed, so every run on the folder is evaluated on the same images."""
    check_fraction(fraction, "--val-fraction")
    counts = torch.bincount(data.labels, minlength=len(data.classes))
    small = [data.classes[c] for c in range(len(counts)) if 0 < counts[c] < 2]
    if small:
        raise DataError(f"class {small[0]!r} has a single image: a held-out split needs at least 2 per class; add "
                        f"images or give the folder train/ and test/ subfolders")
    val = stratified_subset(data.labels, fraction, EVAL_SUBSET_SEED)
    keep = torch.ones(len(data), dtype=torch.bool)
    keep[val] = False
    return data.subset(torch.nonzero(keep).flatten()), data.subset(val)


def split_name(spec: str) -> str:
    """What the evaluation set of ``spec`` is called in printed lines: its test split, or the validation
    split held out of its training images (the JSON keys stay ``test_*`` for either; results.json says
    which under ``data.evaluated_on``)."""
    return "test" if has_test_split(spec) else "val"


def load_splits(spec: str, val_fraction: float = 0.2) -> tuple[LabelledImages, LabelledImages, str]:
    """(train, evaluation set, what the evaluation set is). A folder without train/ and test/ gets a
    held-out validation split instead of being tested on its own training images."""
    if has_test_split(spec):
        return load_labelled(spec, "train"), load_labelled(spec, "test"), "test"
    train, val = held_out_split(load_labelled(spec, "train"), val_fraction)
    return train, val, f"held-out validation ({val_fraction:g} of each class, {len(val)} images)"


def scheduled_lr(scheduler, optimizer, step: int) -> float:
    scheduler.step_update(step)
    return max_lr(optimizer)


def load_data(spec: str, label_fraction: float, eval_limit: int,
              seed: int, val_fraction: float = 0.2) -> tuple[LabelledImages, LabelledImages, int]:
    """(training subset, test subset, training images before --label-fraction)."""
    train, test, what = load_splits(spec, val_fraction)
    if what != "test":
        print(f"{spec} has no train/ and test/ folders: evaluating on a {what}; {len(train)} training images")
    total = len(train)
    if label_fraction < 1:
        train = train.subset(stratified_subset(train.labels, label_fraction, seed))
    return train, limit_subset(test, eval_limit, EVAL_SUBSET_SEED), total


# what makes a folder a finetune run
RUN_FILES = ("last.pth", "best.safetensors", "best-ema.safetensors", "results.json", "log.jsonl")


def main(args) -> dict:
    """Finetunes as ``tools/finetune.py`` describes; returns the results also written to results.json
    (``results["stopped_by"]``: the signal that stopped it early, see :mod:`mimsparse.train.stop_signal`).
    The output folder is held (locked) while it runs; a start that fails before its first step
    removes the folder it created. Under torchrun (DDP), ``--batch-size`` is per process, rank 0 alone
    prints and writes, and N processes at batch B train like one at batch N x B."""
    from mimsparse.train.run_folder import held
    from mimsparse.train.stop_signal import DEFAULT_SIGNALS, StopSignal

    check_args(args)
    job = distributed.current()
    stop = StopSignal(getattr(args, "stop_signals", DEFAULT_SIGNALS))
    with held(args.output_dir, "finetune.py", job.is_main, job.enabled, args.device) as folder, stop, \
            _printing(job.is_main):
        results = _finetune(args, folder, stop)
        distributed.barrier()  # rank 0 has written before any process leaves (torchrun ends a job at its first exit)
        return results


def evaluate_only(args) -> dict:
    """``--eval``: top-1 of a finetuned classifier (a run folder, its best.safetensors or last.pth) on the
    evaluation split of ``--data``; nothing is trained or written. Under torchrun each process
    evaluates its share."""
    from mimsparse.evaluate.predict import load_classifier

    if args.checkpoint == "random" or not Path(args.checkpoint).exists():
        raise ConfigError(f"--eval evaluates a finetuned classifier: pass the run folder, best.safetensors or "
                          f"last.pth of a tools/finetune.py run (got {args.checkpoint!r})")
    check_img_size(args.img_size)
    job = distributed.current()
    with _printing(job.is_main):
        classifier = load_classifier(args.checkpoint, args.model)
        train, test, _ = load_splits(args.data, args.val_fraction)
        if list(train.classes) != list(classifier.classes):
            raise CheckpointError(f"{args.checkpoint} was finetuned on classes {classifier.classes[:5]}, {args.data} "
                                  f"has {list(train.classes)[:5]}: evaluate on the data it was finetuned on")
        test, split = limit_subset(test, args.eval_limit, EVAL_SUBSET_SEED), split_name(args.data)
        if classifier.img_size != args.img_size:
            print(f"note: evaluating at --img-size {args.img_size}; the model was finetuned at "
                  f"{classifier.img_size}")
        device = torch.device(args.device)
        loader = eval_loader(test, args.img_size, args.batch_size, args.num_workers, job.rank, job.world_size)
        result = evaluate(classifier.model.to(device), loader, device, AMP_DTYPES[getattr(args, "amp", "none")])
        print(f"{split} top-1 {result['top1']:.2%} ({result['correct']}/{result['total']}) | loss "
              f"{result['loss']:.4f} | {classifier.name} from {args.checkpoint} on {args.data}")
    return {"eval": result, "stopped_by": None}


@contextlib.contextmanager
def _printing(main: bool):
    """The lines of a run come from rank 0 alone (errors still come from the process that has one)."""
    if main:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


@dataclass
class _Setup:
    """What a finetuning run is made of, built before its first epoch."""
    out_dir: Path
    model: torch.nn.Module  # the timm model: evaluated and saved
    train_model: torch.nn.Module  # what trains: the model, in DDP under torchrun
    name: str
    notes: list
    train: LabelledImages
    test: LabelledImages
    train_total: int
    num_classes: int
    lr: float
    optimizer: torch.optim.Optimizer
    scheduler: object
    total_steps: int
    criterion: torch.nn.Module
    mixup: object
    test_loader: object
    device: torch.device
    split: str  # what the evaluation images are: "test", or a held-out part of the training images
    batch_size: int  # per process and micro-batch (--batch-size)
    options: StepOptions  # accumulation, precision, clipping
    scaler: torch.amp.GradScaler  # fp16's loss scaling; a pass-through otherwise
    ema: object = None  # timm's ModelEmaV3 of the weights (--model-ema), updated after every step

    @property
    def paths(self) -> tuple[Path, Path, Path]:
        """(log.jsonl, best.safetensors, last.pth) of the run folder."""
        return self.out_dir / "log.jsonl", self.out_dir / "best.safetensors", self.out_dir / "last.pth"


def _finetune(args, folder, stop) -> dict:
    from mimsparse.train.run_folder import clear_run_files, refuse_other_run

    start = time.perf_counter()
    out_dir = folder.folder
    best_path, last_path = out_dir / "best.safetensors", out_dir / "last.pth"
    resume = resume_path(getattr(args, "resume", None), last_path)
    nothing_to_resume = getattr(args, "resume", None) == "auto" and not best_path.exists()  # a requeued job starts
    theirs = refuse_other_run(out_dir, [out_dir / f for f in RUN_FILES], resume is not None,
                              getattr(args, "overwrite", False) or nothing_to_resume)
    distributed.barrier()  # every process has looked at the folder before rank 0 changes it
    if not distributed.current().is_main:
        theirs = []  # rank 0 deletes them
    run = _setup(args, out_dir)
    progress = ([], None, 0, 0, None)  # history, best, step, first epoch, part of a stopped epoch
    if resume is not None:
        progress = _resume(args, run, resume)
    else:
        clear_run_files(out_dir, theirs)  # --overwrite (or --resume auto with nothing to resume): a new run
    history, best, step, stopped_by = _train_epochs(args, run, folder, stop, *progress)
    if stopped_by:
        return {"stopped_by": stopped_by, "steps": step, "last_checkpoint": str(last_path), "history": history}
    if not history:
        raise DataError("no epoch ran: nothing to report")
    return _report(args, run, history, best, step, time.perf_counter() - start)


def _setup(args, out_dir: Path) -> _Setup:
    """Data, model, optimizer, schedule and loss of ``args``, and the line that says them."""
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    device, job = torch.device(args.device), distributed.current()
    train, test, train_total = load_data(args.data, args.label_fraction, args.eval_limit, args.seed,
                                         args.val_fraction)
    num_classes = len(train.classes)
    accum = getattr(args, "accum_iter", 1)
    global_batch = args.batch_size * job.world_size * accum
    steps_per_epoch = len(train) // global_batch
    if steps_per_epoch == 0:
        per = (f" x {job.world_size} processes" if job.enabled else "") + (f" x {accum} accumulated" if accum > 1
                                                                            else "")
        raise DataError(f"{len(train)} training images (after --label-fraction {args.label_fraction:g}) are fewer than "
                        f"one batch ({args.batch_size}{per}); lower --batch-size")

    model, name, notes = build_model(args.checkpoint, args.model, num_classes, args.seed, args.drop_path,
                                     args.head_init_scale)
    model.to(device)
    train_model = model
    if job.enabled:  # DDP averages the gradients: the step of one process at the global batch
        from torch.nn.parallel import DistributedDataParallel

        import warnings

        # timm's depthwise weights [C, 1, k, k] get gradients whose stride differs from DDP's bucket view in
        # their size-1 dimension only: the same memory order, so DDP's warning about it says nothing
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    seed_everything(args.seed + job.rank)  # each process its own drop path and mixup draws, as MAE seeds them
    lr = peak_lr(args.lr, args.blr, global_batch)
    optimizer = create_optimizer(model, lr, args.weight_decay, args.layer_decay)
    total_steps = steps_per_epoch * args.epochs
    scheduler = create_scheduler(optimizer, total_steps, warmup_steps(args.warmup_epochs, steps_per_epoch, total_steps),
                                 args.min_lr)
    mixup = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                      num_classes=num_classes)
        criterion = SoftTargetCrossEntropy()  # mixup already smooths the targets
    else:
        criterion = torch.nn.CrossEntropyLoss(label_smoothing=args.smoothing)
    test_loader = eval_loader(test, args.img_size, args.batch_size, args.num_workers, job.rank, job.world_size)
    amp = AMP_DTYPES[getattr(args, "amp", "none")]
    options = StepOptions(accum, amp, getattr(args, "clip_grad", 0.0), args.max_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    ema = None
    if getattr(args, "model_ema", False):
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=args.model_ema_decay)  # a copy on the model's device, in eval mode

    lr_source = f"--lr {args.lr:g}" if args.lr is not None else f"--blr {args.blr:g} x {global_batch}/256"
    split = split_name(args.data)
    for note in notes:
        print(note)
    print(f"model {name} | {args.data}: {num_classes} classes, {len(train)}/{train_total} training images "
          f"(--label-fraction {args.label_fraction:g}), {len(test)} {split} images | "
          f"{_batch_line(args.batch_size, job.world_size, accum)}"
          f"lr {lr:.3g} ({lr_source}) | {total_steps} steps | output {out_dir}")
    return _Setup(out_dir, model, train_model, name, notes, train, test, train_total, num_classes, lr, optimizer,
                  scheduler, total_steps, criterion, mixup, test_loader, device, split, args.batch_size, options,
                  scaler, ema)


def _batch_line(batch: int, processes: int, accum: int) -> str:
    """``batch 4 x 2 processes x 4 accumulated | `` when the global batch is more than --batch-size."""
    parts = [f" x {processes} processes"] * (processes > 1) + [f" x {accum} accumulated"] * (accum > 1)
    return f"batch {batch}{''.join(parts)} | " if parts else ""


def _resume(args, run: _Setup, resume: Path) -> tuple:
    """(history, best, step, first epoch, part of a stopped epoch) from last.pth; weights, optimizer and
    RNGs restored."""
    state = load_resume_state(resume, run.name, run.train.classes)
    run.model.load_state_dict(state["model"], strict=True)
    run.optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    if run.ema is not None:
        if state.get("ema") is None:
            raise CheckpointError(f"{resume} has no EMA weights: resume without --model-ema, or start a new run")
        run.ema.module.load_state_dict(state["ema"])
    history, best, step, first_epoch = state["history"], state["best"], state["step"], state["epoch"]
    job = distributed.current()
    part = _same_global_batch(state, run, job.world_size, resume)
    rngs = state.get("rng_per_process") or [state["rng"]]
    if len(rngs) == job.world_size:
        set_rng_state(rngs[job.rank])
    else:  # another number of processes: their drop path and mixup streams start again (data order is kept)
        seed_everything(args.seed + job.rank + 1_000_003 * step)
        print(f"resume: last.pth was written by {len(rngs)} process(es), this job has {job.world_size}: the data "
              f"order continues exactly, the drop-path and mixup draws start new streams")
    where = f", batch {part['batches_done']}" if part else ""
    print(f"resumed from {resume}: epoch {first_epoch}{where}, step {step}; the schedule now spans {args.epochs} "
          f"epochs ({run.total_steps} steps), next lr {scheduled_lr(run.scheduler, run.optimizer, step):.2e}")
    if first_epoch >= args.epochs:
        print(f"the run already finished its {first_epoch} epochs; pass --epochs N > {first_epoch} to continue")
    return history, best, step, first_epoch, part


def _same_global_batch(state: dict, run: _Setup, processes: int, resume: Path) -> dict | None:
    """The part of a stopped epoch, in this job's loader batches. The global batch (per-process batch x
    processes x accumulated micro-batches) must be the one last.pth was trained at: the schedule, the lr
    and every step's images follow from it. How it is split may change (a requeued job on fewer GPUs
    with more accumulation): every step still sees the same images."""
    part, layout = state.get("part"), state.get("layout")
    if layout is None:  # a last.pth of before the layout was recorded
        return part
    old = layout["batch_size"] * layout["processes"] * layout["accum"]
    new = run.batch_size * processes * run.options.accum
    if old != new:
        per = run.batch_size * processes
        hint = f"; e.g. --accum-iter {old // per}" if old % per == 0 else ""
        raise CheckpointError(f"{resume} was trained at a global batch of {old} ({layout['batch_size']} x "
                              f"{layout['processes']} process(es) x {layout['accum']} accumulated), this job's is "
                              f"{new} ({run.batch_size} x {processes} x {run.options.accum}): keep the global batch "
                              f"(the schedule, lr and each step's images follow from it){hint}")
    if part is None:
        return None
    consumed = part["batches_done"] * layout["batch_size"] * layout["processes"]  # images of the epoch, all processes
    return {**part, "batches_done": consumed // (run.batch_size * processes)}


def _train_epochs(args, run: _Setup, folder, stop, history: list, best, step: int, first_epoch: int,
                  part) -> tuple[list, dict | None, int, str | None]:
    """Epochs from ``first_epoch`` (``part``: where a signal stopped it), each evaluated, logged and
    saved (best.safetensors on a better top-1, last.pth always). Returns (history, best, step,
    the signal that stopped it or None)."""
    from mimsparse.train.stop_signal import STOP_EXIT_STATUS

    log_path, best_path, last_path = run.paths
    job = distributed.current()
    meta = {"model_name": run.name, "num_classes": run.num_classes, "class_names": list(run.train.classes),
            "img_size": args.img_size, "source_checkpoint": str(args.checkpoint), "data": str(args.data)}
    last = min(run.total_steps, args.max_steps) if args.max_steps else run.total_steps
    pace = Pace(last)  # one for the whole run: its first step holds the one-off costs
    periodic = PeriodicSave(getattr(args, "save_every_steps", 0), getattr(args, "save_every_minutes", 0.0))
    for epoch in range(first_epoch, args.epochs):
        t0 = time.perf_counter()
        loader = train_loader(run.train, args.img_size, args.batch_size, args.seed, epoch, args.num_workers,
                              part["batches_done"] if part else 0, job.rank, job.world_size, run.options.accum)
        folder.started = True
        # within the epoch: last.pth as a signal's stop writes it (this epoch, the part of it done)
        periodic.write = lambda at, done: save_resume_state(last_path, run, epoch, at, history, best, done)  # noqa: B023
        stats = train_one_epoch(run, loader, step, run.options, f"epoch {epoch}",
                                not args.no_progress and interactive(), stop, part, args.log_every, pace, periodic)
        step, part = stats["step"], None
        if stats["stopped"]:  # the epoch is not over: no evaluation, no log record; its sums go with last.pth
            save_resume_state(last_path, run, epoch, step, history, best, stats["part"])
            print(f"stopped by {stats['stopped']} at step {step} (epoch {epoch}, batch {stats['batches_done']}): "
                  f"checkpoint {last_path}; continue with --resume auto (exit status {STOP_EXIT_STATUS})", flush=True)
            return history, best, step, stats["stopped"]
        result = evaluate(run.model, run.test_loader, run.device, run.options.amp)
        record = {"epoch": epoch, "step": step, "train_loss": stats["loss"], "lr": stats["lr"],
                  "test_top1": result["top1"], "test_loss": result["loss"], "test_correct": result["correct"],
                  "test_total": result["total"], "unreadable": stats["unreadable"],
                  "epoch_time_s": time.perf_counter() - t0}
        if best is None or result["top1"] > best["test_top1"]:  # the criterion: top-1 on the evaluation set
            best = record
            if job.is_main:
                save_weights(weights_of(run.model), best_path, {**meta, "epoch": epoch, "test_top1": result["top1"]})
        ema_line = ""
        if run.ema is not None:  # the averaged weights, evaluated and kept on their own (best-ema.safetensors)
            ema = evaluate(run.ema.module, run.test_loader, run.device, run.options.amp)
            record.update(ema_top1=ema["top1"], ema_loss=ema["loss"], ema_correct=ema["correct"])
            if ema["top1"] > max((r["ema_top1"] for r in history if "ema_top1" in r), default=-1.0) and job.is_main:
                save_weights(weights_of(run.ema.module), run.out_dir / "best-ema.safetensors",
                             {**meta, "epoch": epoch, "test_top1": ema["top1"], "ema_decay": run.ema.decay})
            ema_line = f" | EMA top-1 {ema['top1']:.2%}"
        history.append(record)
        if job.is_main:
            append_jsonl(log_path, record)
        save_resume_state(last_path, run, epoch + 1, step, history, best)
        periodic.saved()
        train_loss = f"{stats['loss']:.4f}" if stats["loss"] is not None else "-"
        print(f"epoch {epoch}: step {step} | train loss {train_loss} | lr {stats['lr']:.2e} | "
              f"{run.split} top-1 {result['top1']:.2%} ({result['correct']}/{result['total']}) | "
              f"best {best['test_top1']:.2%}{ema_line}")
        if args.max_steps and step >= args.max_steps:
            break
        if stop.requested():  # signalled while evaluating or saving: last.pth has this whole epoch
            stopped_by = stop.reason()
            print(f"stopped by {stopped_by} after epoch {epoch} (step {step}): checkpoint {last_path}; continue "
                  f"with --resume auto (exit status {STOP_EXIT_STATUS})", flush=True)
            return history, best, step, stopped_by
    return history, best, step, None


def _report(args, run: _Setup, history: list, best: dict, step: int, wall_time_s: float) -> dict:
    """results.json of a finished run, and the lines that say where its weights are."""
    log_path, best_path, last_path = run.paths
    results = {"model": run.name, "ckpt": args.checkpoint, "weights": run.notes, "num_classes": run.num_classes,
               "data": {"name": args.data, "train_images": len(run.train), "train_images_total": run.train_total,
                        "test_images": len(run.test), "evaluated_on": run.split},
               "lr": run.lr, "steps": step, "best_top1": best["test_top1"], "best_epoch": best["epoch"],
               "final_top1": history[-1]["test_top1"], "best_checkpoint": str(best_path),
               "last_checkpoint": str(last_path), "classes": list(run.train.classes), "history": history,
               "args": vars(args), "wall_time_s": wall_time_s, "stopped_by": None,
               "processes": distributed.current().world_size}
    emas = [r for r in history if "ema_top1" in r]
    if emas:
        best_ema = max(emas, key=lambda r: r["ema_top1"])  # the first of the highest, as best-ema.safetensors
        results.update(best_ema_top1=best_ema["ema_top1"], best_ema_epoch=best_ema["epoch"],
                       final_ema_top1=emas[-1]["ema_top1"],
                       best_ema_checkpoint=str(run.out_dir / "best-ema.safetensors"))
    if distributed.current().is_main:
        write_json(run.out_dir / "results.json", results)
    print(f"best top-1 {results['best_top1']:.2%} (epoch {results['best_epoch']}), final {results['final_top1']:.2%}; "
          f"wrote {best_path} (weights + class names; tools/predict.py {best_path} IMAGES), {last_path} (--resume), "
          f"{run.out_dir / 'results.json'}, {log_path}")
    print(f"load with: {load_lines(run.name, run.num_classes, best_path)[0]}")
    return results
