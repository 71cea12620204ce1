"""Labelled images -> tensors for finetuning (:mod:`mimsparse.evaluate.finetune`) and the linear probe
(:mod:`mimsparse.evaluate.linear_probe`): transforms, seeded stratified subsets, loaders, top-1 counting.

Augmentation reuses the pretraining machinery (:class:`mimsparse.train.data.SeededImages`,
:class:`mimsparse.train.data.EpochSampler`): every training sample draws its crop and flip from its own seed,
so a run is reproducible whatever the worker count.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from torchvision import transforms

from mimsparse.train.data import (IMAGENET_MEAN, IMAGENET_STD, DataError, EpochSampler, SeededImages, collate_skip_bad,
                            seed_worker)
from mimsparse.evaluate.datasets import LabelledImages

STRIDE = 32  # total downsampling of ConvNeXt V2 and ResNet: smaller inputs leave no spatial site
MIN_CROP_SCALE = 0.35  # RandomResizedCrop area range of the ConvNeXt V2 / MAE finetune recipe, scaled to small data
BICUBIC = transforms.InterpolationMode.BICUBIC


def check_img_size(img_size: int) -> None:
    if img_size < STRIDE or img_size % STRIDE:
        nearest = max(STRIDE, round(img_size / STRIDE) * STRIDE)
        raise DataError(f"--img-size {img_size} is not a positive multiple of {STRIDE} (the networks downsample by "
                        f"{STRIDE}); e.g. --img-size {nearest}. Smaller images are resized up to it.")


def check_fraction(fraction: float, flag: str = "--label-fraction") -> None:
    if not 0 < fraction <= 1:
        raise DataError(f"{flag} {fraction:g} must be in (0, 1], e.g. 0.1 for 10 % of the labels")


def train_transform(img_size: int) -> transforms.Compose:
    return transforms.Compose([
        transforms.RandomResizedCrop(img_size, scale=(MIN_CROP_SCALE, 1.0), interpolation=BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_transform(img_size: int) -> transforms.Compose:
    """Shorter side to ``img_size``, centre crop (a plain resize for square images such as 28x28)."""
    return transforms.Compose([
        transforms.Resize(img_size, interpolation=BICUBIC),
        transforms.CenterCrop(img_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def stratified_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices (sorted, int64) of round(fraction * n_c) items of every class c, at least one each, drawn
    by a generator seeded with ``seed`` alone: the same seed keeps the same labelled images whatever
    else changes. ``labels``: int64 [N]."""
    check_fraction(fraction)
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in torch.unique(labels).tolist():  # sorted classes: the draw order does not depend on the data order
        members = torch.nonzero(labels == c).flatten()
        k = max(1, round(fraction * len(members)))
        keep.append(members[torch.randperm(len(members), generator=g)[:k]])
    return torch.cat(keep).sort().values


def limit_subset(data: LabelledImages, limit: int, seed: int) -> LabelledImages:
    """At most about ``limit`` items, stratified and seeded (0 or >= len: all of them)."""
    if limit <= 0 or limit >= len(data):
        return data
    return data.subset(stratified_subset(data.labels, limit / len(data), seed))


class LabelledSamples(SeededImages):
    """(index, augmentation seed) -> (image [3, H, W], label), or None for an unreadable file."""

    def __getitem__(self, item):
        sample = super().__getitem__(item)
        return None if sample is None else (sample[0], int(self.source.labels[item[0]]))


def train_loader(data: LabelledImages, img_size: int, batch_size: int, seed: int, epoch: int,
                 num_workers: int = 0, start_batch: int = 0, rank: int = 0, world_size: int = 1,
                 accum: int = 1) -> DataLoader:
    """One epoch of full batches (images [B, 3, S, S], labels int64 [B], number dropped as unreadable),
    shuffled and augmented from (seed, epoch), from batch ``start_batch`` on (a resume mid-epoch). Under
    torchrun, this rank's share of every global batch (see :class:`EpochSampler`): N processes at batch B
    see the images and augmentations of one process at batch N x B. ``accum``: micro-batches per step;
    the epoch is cut to whole steps."""
    sampler = EpochSampler(len(data), seed, epoch, start=start_batch * batch_size, rank=rank, world_size=world_size,
                           batch_size=batch_size * accum)
    # its own generator: the loader's seed draw leaves the global one (drop path) to the training steps,
    # so a run resumed mid-epoch draws what the uninterrupted run drew
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    # collate_skip_bad stacks the second item of each sample: here the label, not a seed
    return DataLoader(LabelledSamples(data, train_transform(img_size)), batch_size=batch_size, sampler=sampler,
                      drop_last=True, num_workers=num_workers, collate_fn=collate_skip_bad, worker_init_fn=seed_worker,
                      generator=generator)


def eval_loader(data: LabelledImages, img_size: int, batch_size: int, num_workers: int = 0, rank: int = 0,
                world_size: int = 1) -> DataLoader:
    """All items in order (under torchrun: items rank, rank + N, ..., so the ranks' sums cover each
    item once), without augmentation: (images, labels, number dropped as unreadable)."""
    items = [(i, 0) for i in range(rank, len(data), world_size)]  # the seed is unused by the deterministic transform
    return DataLoader(LabelledSamples(data, eval_transform(img_size)), batch_size=batch_size, sampler=items,
                      num_workers=num_workers, collate_fn=collate_skip_bad, worker_init_fn=seed_worker)


def top1_correct(logits: torch.Tensor, labels: torch.Tensor) -> int:
    """Number of rows of ``logits`` [B, K] whose arg-max is the label (int64 [B])."""
    return int((logits.argmax(dim=-1) == labels).sum())
