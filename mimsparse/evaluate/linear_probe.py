"""Linear probe (MAE, main_linprobe.py): a linear classifier on the frozen encoder's features.

Features are the global average pool of timm ``forward_features`` ([B, C, H, W] -> [B, C]), computed
once per image without augmentation (eval transform) by the encoder in eval mode and kept in memory.
The head is MAE's: BatchNorm1d without affine parameters (eps 1e-6, it only standardises the features)
followed by a Linear layer whose weight starts as trunc_normal(std 0.01). MAE trains it with LARS at
batch 16384; here the cached features make plain SGD (momentum 0.9) with MAE's per-step warm-up +
cosine schedule and lr = blr x batch / 256 cheap and stable at the small batches small data allows.
Weights are loaded exactly as for finetuning (:func:`mimsparse.evaluate.finetune.build_model`).
"""
from __future__ import annotations

import time

import torch
from torch import nn
from tqdm import tqdm

from mimsparse.train.run_folder import RunFolder, clear_run_files, held, refuse_other_run
from mimsparse.evaluate.loaders import check_img_size, eval_loader, limit_subset, top1_correct
from mimsparse.train.data import DataError
from mimsparse.cli import interactive
from mimsparse.errors import ConfigError
from mimsparse.evaluate.finetune import (EVAL_SUBSET_SEED, append_jsonl, create_scheduler, load_splits, peak_lr,
                                         warmup_steps, write_json)
from mimsparse.evaluate.finetune_engine import max_lr
from mimsparse.evaluate.initial_weights import build_model


def pooled_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """images [B, 3, H, W] -> global average pool of ``model.forward_features`` [B, C]."""
    feats = model.forward_features(images)
    if feats.dim() != 4:
        raise ConfigError(f"forward_features returned shape {tuple(feats.shape)}; the probe expects [B, C, H, W] maps")
    return feats.mean(dim=(2, 3))


@torch.no_grad()
def extract_features(model: nn.Module, loader, device, desc: str = "", show_progress: bool = True):
    """(features float32 [N, C] on the CPU, labels int64 [N]) of every readable image of ``loader``."""
    model.eval()
    feats, labels = [], []
    for images, batch_labels, _ in tqdm(loader, desc=desc, disable=not show_progress, dynamic_ncols=True, leave=False):
        if len(images):
            feats.append(pooled_features(model, images.to(device)).float().cpu())
            labels.append(batch_labels)
    if not feats:
        raise DataError(f"no readable image to compute {desc or 'the'} features of")
    return torch.cat(feats), torch.cat(labels)


def probe_head(dim: int, num_classes: int) -> nn.Sequential:
    """BatchNorm1d(affine=False, eps=1e-6) + Linear(dim, num_classes), weight ~ trunc_normal(std 0.01), bias 0."""
    from timm.layers import trunc_normal_

    linear = nn.Linear(dim, num_classes)
    trunc_normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)


@torch.no_grad()
def evaluate_probe(head: nn.Module, feats: torch.Tensor, labels: torch.Tensor) -> dict:
    """{"top1" in [0, 1], "loss", "correct", "total"} of ``head`` in eval mode (BN running statistics)."""
    head.eval()
    logits = head(feats)
    correct = top1_correct(logits, labels)
    return {"top1": correct / len(labels), "loss": nn.functional.cross_entropy(logits, labels).item(),
            "correct": correct, "total": len(labels)}


def train_probe(head: nn.Module, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                epochs: int, lr: float, batch_size: int, weight_decay: float = 0.0, warmup_epochs: float = 0.0,
                min_lr: float = 0.0, seed: int = 0, on_epoch=None) -> list[dict]:
    """SGD (momentum 0.9) on cached (features [N, C], labels [N]); returns one record per epoch with the
    test top-1. Batches are full (a batch of one would break BatchNorm); ``on_epoch(record)`` is called
    after each epoch."""
    feats, labels = train
    if len(labels) < 2:
        raise DataError(f"the probe needs at least 2 training images (BatchNorm statistics), got {len(labels)}")
    batch_size = min(batch_size, len(labels))
    steps_per_epoch = len(labels) // batch_size
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    total = steps_per_epoch * epochs
    scheduler = create_scheduler(optimizer, total, warmup_steps(warmup_epochs, steps_per_epoch, total), min_lr)
    g = torch.Generator().manual_seed(seed)
    history, step = [], 0
    for epoch in range(epochs):
        head.train()
        order = torch.randperm(len(labels), generator=g)[:steps_per_epoch * batch_size].view(steps_per_epoch, -1)
        loss_sum = 0.0
        for idx in order:
            scheduler.step_update(step)
            loss = nn.functional.cross_entropy(head(feats[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item()
            step += 1
        result = evaluate_probe(head, *test)
        record = {"epoch": epoch, "step": step, "train_loss": loss_sum / steps_per_epoch, "lr": max_lr(optimizer),
                  "test_top1": result["top1"], "test_loss": result["loss"], "test_correct": result["correct"],
                  "test_total": result["total"]}
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
    return history


def check_args(args) -> None:
    check_img_size(args.img_size)
    for flag in ("epochs", "batch_size", "extract_batch_size"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.train_limit < 0 or args.eval_limit < 0:
        raise ConfigError("--train-limit and --eval-limit must be >= 0 (0 = all images)")
    if peak_lr(args.lr, args.blr, args.batch_size) <= 0:
        raise ConfigError("the learning rate must be positive (--lr or --blr)")


RUN_FILES = ("results.json", "log.jsonl")  # what makes a folder a probe run


def main(args) -> dict:
    """Linear probe as ``tools/linear_probe.py`` describes; returns the results also written to results.json.
    The output folder is held (locked) while it runs and guarded like every run folder
    (:mod:`mimsparse.train.run_folder`): another run's results need ``--overwrite``."""
    check_args(args)
    with held(args.output_dir, "linear_probe.py") as folder:
        theirs = refuse_other_run(folder.folder, [folder.folder / f for f in RUN_FILES], False,
                                  getattr(args, "overwrite", False), resumable=False)
        return _probe(args, folder, theirs)


def _probe(args, folder: RunFolder, theirs: list) -> dict:
    start = time.perf_counter()
    out_dir = folder.folder
    device = torch.device(args.device)
    train_all, test, what = load_splits(args.data, args.val_fraction)
    if what != "test":
        print(f"{args.data} has no train/ and test/ folders: evaluating on a {what}")
    split = "test" if what == "test" else "val"
    train = limit_subset(train_all, args.train_limit, args.seed)
    test = limit_subset(test, args.eval_limit, EVAL_SUBSET_SEED)
    num_classes = len(train.classes)

    # the classifier of the timm model is built (so every checkpoint loads as for finetuning) but never used
    model, name, notes = build_model(args.checkpoint, args.model, num_classes, args.seed)
    model.requires_grad_(False)
    model.to(device)
    for note in notes:
        print(note)
    t0 = time.perf_counter()
    show = not args.no_progress and interactive()
    train_feats = extract_features(model, eval_loader(train, args.img_size, args.extract_batch_size, args.num_workers),
                                   device, "train features", show)
    test_feats = extract_features(model, eval_loader(test, args.img_size, args.extract_batch_size, args.num_workers),
                                  device, f"{split} features", show)
    extract_s = time.perf_counter() - t0
    dim = train_feats[0].shape[1]
    batch_size = min(args.batch_size, len(train_feats[1]))  # train_probe's cap, so the lr scales with the real batch
    lr = peak_lr(args.lr, args.blr, batch_size)
    lr_source = f"--lr {args.lr:g}" if args.lr is not None else f"--blr {args.blr:g} x {batch_size}/256"
    print(f"model {name} (frozen) | {args.data}: {num_classes} classes, {len(train_feats[1])}/{len(train_all)} "
          f"training images, {len(test_feats[1])} {split} images | features [{dim}] in {extract_s:.1f} s | "
          f"lr {lr:.3g} ({lr_source}) | output {out_dir}")

    log_path = out_dir / "log.jsonl"
    clear_run_files(out_dir, theirs)  # --overwrite: the log and results describe this run only
    folder.started = True

    def report(record: dict) -> None:
        append_jsonl(log_path, record)
        print(f"epoch {record['epoch']}: train loss {record['train_loss']:.4f} | lr {record['lr']:.2e} | {split} top-1 "
              f"{record['test_top1']:.2%} ({record['test_correct']}/{record['test_total']})")

    torch.manual_seed(args.seed)
    head = probe_head(dim, num_classes)
    history = train_probe(head, train_feats, test_feats, args.epochs, lr, args.batch_size, args.weight_decay,
                          args.warmup_epochs, args.min_lr, args.seed, on_epoch=report)
    best = max(history, key=lambda r: r["test_top1"])  # the first of equal maxima
    results = {"model": name, "ckpt": args.checkpoint, "weights": notes, "num_classes": num_classes, "feature_dim": dim,
               "data": {"name": args.data, "train_images": len(train_feats[1]), "train_images_total": len(train_all),
                        "test_images": len(test_feats[1]), "evaluated_on": split},
               "lr": lr, "optimizer": "SGD momentum 0.9", "best_top1": best["test_top1"], "best_epoch": best["epoch"],
               "final_top1": history[-1]["test_top1"], "history": history, "args": vars(args),
               "feature_time_s": extract_s, "wall_time_s": time.perf_counter() - start}
    write_json(out_dir / "results.json", results)
    print(f"final top-1 {results['final_top1']:.2%} (best {results['best_top1']:.2%} at epoch "
          f"{results['best_epoch']}); wrote {out_dir / 'results.json'}, {log_path}")
    return results
