"""Data-loading throughput: images/s of decode + augment (the pretraining transform) from an image
folder and from the same images packed as tar shards, through the DataLoader the trainer builds,
for several ``data.num_workers``. Compare with the model's img/s (tools/benchmark.py, train step) to
size ``data.num_workers``: a training step waits for data when the loader delivers fewer.

Timing starts when the first batch arrives (worker start-up excluded) and counts the images after it.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from torch.utils.data import DataLoader

from mimsparse.train.data import (EpochSampler, FileSource, SeededImages, bundled_photo_paths, collate_skip_bad,
                                  list_images, pretrain_transform, seed_worker)
from mimsparse.train.shards import ShardImages, write_shards


def _loader(source: str, dataset, batch_size: int, batches: int, workers: int, epoch: int) -> DataLoader:
    if source == "shards":
        stream = dataset.epoch(seed=0, epoch=epoch, rank=0, world_size=1, batch_size=batch_size, batches=batches)
        return DataLoader(stream, batch_size=batch_size, num_workers=workers, collate_fn=collate_skip_bad,
                          worker_init_fn=seed_worker)
    sampler = EpochSampler(len(dataset), 0, epoch, repeat=-(-batches * batch_size // len(dataset)))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True,
                      collate_fn=collate_skip_bad, worker_init_fn=seed_worker)


def time_loader(loader: DataLoader, batches: int) -> tuple[float, int]:
    """(seconds from the first batch to the ``batches``-th, images after the first)."""
    images, t0 = 0, None
    for i, (x, _, _) in enumerate(loader):
        if t0 is None:
            t0 = time.perf_counter()
        else:
            images += x.shape[0]
        if i + 1 == batches:
            break
    return time.perf_counter() - t0, images


def run_data_benchmark(folder: str | Path | None = None, img_size=(224, 224), min_scale: float = 0.2,
                       workers=(0, 1, 2), batch_size: int = 16, batches: int = 10, repeats: int = 3,
                       shard_size: int = 4) -> dict:
    """Rows (source, workers, img/s median/min/max, img/s per worker) for the folder (default: the
    bundled photos, full size) and the same files as shards (written to a temporary folder)."""
    paths = list_images(folder) if folder else bundled_photo_paths()
    transform = pretrain_transform(img_size, min_scale)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if folder is None:  # the bundled photos live among other files: pack a copy of just them
            folder = Path(tmp) / "photos"
            folder.mkdir()
            for p in paths:
                (folder / p.name).write_bytes(p.read_bytes())
        _, pattern = write_shards(folder, Path(tmp) / "shards", shard_size)
        datasets = {"folder": SeededImages(FileSource(paths), transform),
                    "shards": ShardImages(pattern, transform, shuffle_buffer=shard_size)}
        for source, dataset in datasets.items():
            for w in workers:
                if source == "shards":
                    dataset.check_split(1, w)
                rates = []
                for r in range(repeats):
                    seconds, images = time_loader(_loader(source, dataset, batch_size, batches, w, r), batches)
                    rates.append(images / seconds)
                median = statistics.median(rates)
                rows.append({"source": source, "workers": w, "img_per_s": median, "min": min(rates),
                             "max": max(rates), "img_per_s_per_worker": median / max(1, w)})
    return {"images": len(paths), "img_size": list(img_size), "batch_size": batch_size, "batches": batches,
            "repeats": repeats, "rows": rows}


def markdown_table(result: dict) -> str:
    lines = ["| source | data.num_workers | img/s (min–max) | img/s per worker |", "|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['source']} | {r['workers']} | {r['img_per_s']:.1f} ({r['min']:.1f}–{r['max']:.1f}) | "
                     f"{r['img_per_s_per_worker']:.1f} |")
    return "\n".join(lines)
