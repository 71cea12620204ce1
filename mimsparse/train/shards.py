"""WebDataset tar shards for datasets too large for a folder: ``data.path='shards/train-{000000..000099}.tar'``.

A shard is a plain tar of image files; files sharing a key (the path up to the first dot) form one
sample, as in ``webdataset``, which reads and writes them here (imported lazily).

Each epoch (seed = run seed + epoch):
- the shard list is shuffled, then cut into ``processes x max(1, data.num_workers)`` disjoint
  parts: rank r takes shards r, r + R, ...; loader worker w of that rank every W-th of those. A worker
  reads whole shards, so there must be at least R x W shards (refused otherwise, naming the fix).
  Unlike a folder, which batches a sample lands in depends on R and W.
- each worker streams its shards through a seeded shuffle buffer (``data.shuffle_buffer``) and
  yields exactly its share of the rank's batches: if its shards hold fewer samples it starts
  another (reshuffled) pass over them; if more, the rest is not read this epoch.
- a sample's augmentation and mask seed is a hash of (seed, epoch, pass, shard, key): the same
  sample gets the same crop whichever worker reads it.

Resume is exact (the batches an uninterrupted run would have had) when the number of processes and
``data.num_workers`` are unchanged: each worker replays its stream without decoding the images it
skips (see :meth:`ShardEpoch.samples`).
"""
from __future__ import annotations

import hashlib
import io
import os
import random
import tarfile
import warnings
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info

from mimsparse.errors import DataError
from mimsparse.train.data import IMAGE_EXTENSIONS, UnreadableImage, to_rgb

SHARD_SUFFIX = ".tar"
_IMAGE_KEYS = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)


def _webdataset():
    try:
        import webdataset
    except ImportError as e:
        raise DataError("tar shards are read with the webdataset package: pip install webdataset "
                        "(scripts/setup.sh installs it)") from e
    return webdataset


def is_shard_spec(path: str) -> bool:
    """Whether ``data.path`` names tar shards (a path, brace pattern or ``::`` list ending in .tar)."""
    return str(path).endswith(SHARD_SUFFIX)


def expand_shards(spec: str) -> list[str]:
    """'dir/train-{000000..000009}.tar' -> the 10 paths (brace expansion; '::' separates lists);
    every shard must exist."""
    urls = _webdataset().shardlists.expand_urls(spec)
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise DataError(f"{len(missing)} of the {len(urls)} shard(s) of {spec!r} do not exist (first: {missing[0]}); "
                        f"check the pattern, e.g. 'shards/train-{{000000..000009}}.tar' for 10 shards written by "
                        f"tools/make_shards.py")
    return urls


def sample_key(name: str) -> tuple[str, str] | tuple[None, None]:
    """'cls/img_1.jpg' -> ('cls/img_1', 'jpg'): webdataset's own split of a member name."""
    return _webdataset().tariterators.base_plus_ext(name)


def count_samples(shard: str) -> int:
    """Samples (keys with an image file) in one shard, from its tar headers (no image is read)."""
    keys = set()
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                key, ext = sample_key(member.name)
                if member.isfile() and key is not None and ext.lower().split(".")[-1] in _IMAGE_KEYS:
                    keys.add(key)
    except (OSError, tarfile.TarError) as e:
        raise DataError(f"shard {shard!r} is not a readable tar file ({e}); rewrite it with tools/make_shards.py") from e
    return len(keys)


def decode_sample(sample: dict):
    """The image of a webdataset sample (the first image extension it has) as 8-bit RGB, decoded as
    the folder loader decodes a file (:func:`mimsparse.train.data.to_rgb`)."""
    from PIL import Image

    ext = next((k for k in sample if not k.startswith("__") and k.split(".")[-1] in _IMAGE_KEYS), None)
    where = f"{sample.get('__url__')}:{sample.get('__key__')}"
    if ext is None:
        raise UnreadableImage(f"{where}: no image file in this sample")
    try:
        with Image.open(io.BytesIO(sample[ext])) as img:
            img.load()
            return to_rgb(img)
    except Exception as e:  # noqa: BLE001 (user data: every failure is this sample's)
        raise UnreadableImage(f"{where}: {type(e).__name__}: {e}") from e


def _seed(*parts) -> int:
    """A stable 62-bit seed from the parts (Python's hash() changes between processes)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


class ShardImages:
    """The shards of ``spec`` (their sample counts read once from the tar headers); ``epoch(...)``
    gives one process's stream for one epoch."""

    def __init__(self, spec: str, transform, shuffle_buffer: int = 1000):
        self.spec = spec
        self.shards = expand_shards(spec)
        self.counts = [count_samples(s) for s in self.shards]
        self.transform = transform
        self.shuffle_buffer = shuffle_buffer
        if not sum(self.counts):
            raise DataError(f"the shards {spec!r} hold no images ({', '.join(IMAGE_EXTENSIONS)}); write them with "
                            f"tools/make_shards.py")

    def __len__(self) -> int:
        return sum(self.counts)

    def check_split(self, world_size: int, num_workers: int) -> None:
        parts = world_size * max(1, num_workers)
        if len(self.shards) < parts:
            per_shard = max(1, len(self) // parts)
            raise DataError(f"{len(self.shards)} shard(s) for {world_size} process(es) x {max(1, num_workers)} loader "
                            f"worker(s): each worker reads whole shards, so at least {parts} are needed; write smaller "
                            f"shards (tools/make_shards.py --shard-size {per_shard}) or lower data.num_workers")

    def epoch(self, seed: int, epoch: int, rank: int, world_size: int, batch_size: int, batches: int,
              start: int = 0) -> ShardEpoch:
        """Rank ``rank``'s ``batches`` batches of ``batch_size`` for ``epoch``, from its batch ``start``."""
        return ShardEpoch(self, seed, epoch, rank, world_size, batch_size, batches, start)


class ShardEpoch(IterableDataset):
    """One process's epoch as an IterableDataset of (image [3, H, W], seed); each DataLoader worker
    streams its own shards (module docstring). Without workers, one stream holds all the rank's shards."""

    def __init__(self, source: ShardImages, seed: int, epoch: int, rank: int, world_size: int, batch_size: int,
                 batches: int, start: int = 0):
        self.source, self.seed, self.epoch, self.rank, self.world_size = source, seed, epoch, rank, world_size
        self.batch_size, self.batches, self.start = batch_size, batches, start

    def part_shards(self, part: int, parts: int) -> list[str]:
        """The shards of part ``part`` of ``parts`` (one per loader worker) of this rank this epoch;
        the parts of all ranks are disjoint and together hold every shard."""
        order = list(self.source.shards)
        random.Random(_seed(self.seed, self.epoch, "shards")).shuffle(order)
        return order[self.rank::self.world_size][part::parts]

    def samples(self, worker: int, num_workers: int):
        """(seed, raw webdataset sample) of the batches loader worker ``worker`` produces, in order.

        Part p of the epoch makes the rank's batches p, p + W, ... (W = num_workers). The DataLoader
        asks worker 0 first, so after a resume at batch ``start`` worker w plays part (start + w) % W,
        replaying the part's stream up to ``start`` without decoding the images it skips."""
        wds = _webdataset()
        part = (self.start + worker) % num_workers
        shards = self.part_shards(part, num_workers)
        skip = len(range(part, self.start, num_workers)) * self.batch_size
        wanted = len(range(part, self.batches, num_workers)) * self.batch_size
        done, repeat = 0, 0
        while done < wanted:
            order = list(shards)
            rng = random.Random(_seed(self.seed, self.epoch, self.rank, part, num_workers, repeat))
            rng.shuffle(order)
            stream = wds.DataPipeline(wds.SimpleShardList(order), wds.tarfile_to_samples(),
                                      wds.shuffle(self.source.shuffle_buffer, initial=self.source.shuffle_buffer,
                                                  rng=rng))
            before = done
            for sample in stream:
                if done >= skip:
                    name = Path(sample["__url__"]).name
                    yield _seed(self.seed, self.epoch, repeat, name, sample["__key__"]), sample
                done += 1
                if done == wanted:
                    return
            if done == before:
                raise DataError(f"shards {', '.join(shards)} hold no samples; rewrite them with tools/make_shards.py")
            repeat += 1

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for seed, sample in self.samples(worker, num_workers):
            try:
                img = decode_sample(sample)
            except UnreadableImage as e:
                warnings.warn(f"skipping unreadable image {e}")
                yield None
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                yield self.source.transform(img), seed


def write_shards(folder: str | Path, out_dir: str | Path, shard_size: int, prefix: str = "train",
                 seed: int | None = 0) -> tuple[list[str], str]:
    """Pack the images below ``folder`` (an ImageFolder or flat folder) into ``out_dir/prefix-000000.tar``,
    ... of ``shard_size`` images each, the files' bytes unchanged (no re-encoding). Keys are the paths
    relative to ``folder`` without extension, dots replaced by '_' (webdataset cuts keys at the first
    dot). The files are shuffled with ``seed`` first (None keeps the sorted order), so that each shard
    mixes the classes. Returns (shard paths, the brace pattern for ``data.path``)."""
    from mimsparse.train.data import list_images

    wds = _webdataset()
    if shard_size < 1:
        raise DataError(f"--shard-size must be >= 1, got {shard_size}")
    folder, out_dir = Path(folder), Path(out_dir)
    if not folder.is_dir():
        raise DataError(f"{str(folder)!r} is not a folder; pass an ImageFolder or a flat folder of images")
    paths = list_images(folder)
    if seed is not None:
        random.Random(seed).shuffle(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(out_dir.glob(f"{prefix}-*{SHARD_SUFFIX}"))
    if existing:
        raise DataError(f"{str(out_dir)!r} already holds {len(existing)} {prefix}-*.tar shard(s); choose an empty folder "
                        f"or another --prefix")
    written = []

    def finished(tmp: str) -> None:  # a shard gets its name only when complete: a killed run leaves no torn .tar
        os.replace(tmp, tmp.removesuffix(".tmp"))
        written.append(tmp.removesuffix(".tmp"))

    # mtime fixed: the same folder gives byte-identical shards
    with wds.ShardWriter(str(out_dir / f"{prefix}-%06d{SHARD_SUFFIX}.tmp"), maxcount=shard_size, verbose=0,
                         post=finished, encoder=False, mtime=0.0) as sink:
        for path in paths:
            rel = path.relative_to(folder)
            key = str(rel.with_suffix("").as_posix()).replace(".", "_")
            sink.write({"__key__": key, path.suffix.lower().lstrip("."): path.read_bytes()})
    pattern = str(out_dir / f"{prefix}-{{000000..{len(written) - 1:06d}}}{SHARD_SUFFIX}")
    return written, pattern
