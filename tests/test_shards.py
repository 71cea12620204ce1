"""webdataset tar shards (mimsparse/train/shards.py, tools/make_shards.py) made from real photos: the
images equal the folder loader's, the per-rank / per-worker split is disjoint and covering, resume
is exact, and pretraining runs from them."""
import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mimsparse.config import load_config
from mimsparse.errors import DataError
from mimsparse.train.data import (FileSource, SeededImages, bundled_photo_paths, collate_skip_bad, list_images,
                                  pretrain_transform, read_image_file)
from mimsparse.train.build import Pretrainer
from mimsparse.train.shards import ShardImages, decode_sample, write_shards
from tests.conftest import run_tool, tiny_overrides


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """scikit-image's photos, as they ship (PNG and JPEG, 300 to 1411 px), in two class folders."""
    root = tmp_path_factory.mktemp("folder")
    for i, path in enumerate(bundled_photo_paths()):
        (root / f"class{i % 2}").mkdir(exist_ok=True)
        shutil.copy(path, root / f"class{i % 2}" / path.name)
    return root


@pytest.fixture(scope="module")
def shards(photo_folder, tmp_path_factory):
    paths, pattern = write_shards(photo_folder, tmp_path_factory.mktemp("shards"), shard_size=2)
    return paths, pattern


def _tar_images(paths):
    """{key: image bytes} read with the standard library (not webdataset)."""
    out = {}
    for path in paths:
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                out[m.name.rsplit(".", 1)[0]] = (m.name, tar.extractfile(m).read())
    return out


def test_shards_hold_every_file_unchanged(photo_folder, shards):
    paths, pattern = shards
    files = list_images(photo_folder)
    assert len(paths) == (len(files) + 1) // 2 and pattern.endswith(f"train-{{000000..{len(paths) - 1:06d}}}.tar")
    assert sorted(p.name for p in Path(paths[0]).parent.iterdir()) == sorted(Path(p).name for p in paths)  # no .tmp
    stored = _tar_images(paths)
    assert sorted(stored) == sorted(str(f.relative_to(photo_folder).with_suffix("")) for f in files)
    for f in files:
        name, data = stored[str(f.relative_to(photo_folder).with_suffix(""))]
        assert name.endswith(f.suffix.lower()) and data == f.read_bytes()


def test_decoded_and_augmented_images_equal_the_folder_loaders(photo_folder, shards):
    """Every sample once (one process, one worker, one pass): decoded pixels equal the folder loader's,
    and the augmented crop equals the folder dataset's for the same sample seed."""
    files = list_images(photo_folder)
    transform = pretrain_transform((64, 96), 0.2)
    source = ShardImages(shards[1], transform, shuffle_buffer=4)
    assert len(source) == len(files)
    epoch = source.epoch(seed=0, epoch=0, rank=0, world_size=1, batch_size=1, batches=len(files))
    folder = SeededImages(FileSource(files), transform)
    index = {str(f.relative_to(photo_folder).with_suffix("")): i for i, f in enumerate(files)}
    seen = []
    for (seed, sample), (image, seed_again) in zip(epoch.samples(0, 1), epoch):
        i = index[sample["__key__"]]
        seen.append(i)
        assert np.array_equal(np.asarray(decode_sample(sample)), np.asarray(read_image_file(files[i])))
        expected, _ = folder[(i, seed)]
        assert seed == seed_again and image.shape == (3, 64, 96) and torch.equal(image, expected)
    assert sorted(seen) == list(range(len(files)))


@pytest.mark.parametrize("world,workers", [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1)])
def test_rank_and_worker_split_is_disjoint_and_covering(shards, world, workers):
    source = ShardImages(shards[1], transform=None)
    stored = _tar_images(shards[0])
    for epoch in (0, 1):
        parts = [source.epoch(7, epoch, rank, world, 1, 100).part_shards(w, workers)
                 for rank in range(world) for w in range(workers)]
        flat = [s for part in parts for s in part]
        assert sorted(flat) == sorted(shards[0]) and all(parts)  # disjoint, covering, none empty
        # what a worker streams comes from its own shards, all of them in its first pass
        for rank in range(world):
            stream = source.epoch(7, epoch, rank, world, 1, 100)
            for w in range(workers):
                mine = stream.part_shards(w, workers)
                keys = {s["__key__"] for _, s in stream.samples(w, workers)}
                assert keys == set(_tar_images(mine)) and keys <= set(stored)
    # the split is drawn from (seed, epoch): reproducible, and another epoch reshuffles
    one = source.epoch(7, 0, 0, 1, 1, 100).part_shards(0, 1)
    assert one == source.epoch(7, 0, 0, 1, 1, 100).part_shards(0, 1)
    assert one != source.epoch(7, 1, 0, 1, 1, 100).part_shards(0, 1)


def test_too_few_shards_for_the_workers_is_refused_with_the_fix(shards):
    source = ShardImages(shards[1], transform=None)
    n = len(shards[0])
    with pytest.raises(DataError, match=rf"^{n} shard\(s\) for 2 process\(es\) x 4 loader worker\(s\): each worker "
                                        rf"reads whole shards, so at least 8 are needed; write smaller shards "
                                        rf"\(tools/make_shards.py --shard-size 1\) or lower data.num_workers$"):
        source.check_split(2, 4)
    source.check_split(2, 2)
    ten = shards[0][0].replace("000000.tar", "{000000..000009}.tar")
    with pytest.raises(DataError, match=rf"^{10 - n} of the 10 shard\(s\) of .* do not exist \(first: .*train-{n:06d}"
                                        rf"\.tar\); check the pattern"):
        ShardImages(ten, None)


def test_mid_epoch_resume_with_loader_workers_gives_the_same_batches(shards):
    """Two DataLoader workers: the batches from batch 3 on equal those of the uninterrupted epoch."""
    source = ShardImages(shards[1], pretrain_transform(32, 0.5), shuffle_buffer=3)

    def batches(start):
        stream = source.epoch(seed=1, epoch=2, rank=0, world_size=1, batch_size=2, batches=7, start=start)
        return [(seeds, images) for images, seeds, _ in
                DataLoader(stream, batch_size=2, num_workers=2, collate_fn=collate_skip_bad)]

    full, resumed = batches(0), batches(3)
    assert len(full) == 7 and len(resumed) == 4  # 10 photos, 7 batches of 2: a second, reshuffled pass
    for (s1, i1), (s2, i2) in zip(full[3:], resumed):
        assert torch.equal(s1, s2) and torch.equal(i1, i2)


def _shard_cfg(out, pattern, **extra):
    return load_config(None, tiny_overrides(out, **{"data.path": pattern, "train.epochs": 2, **extra}))


def test_pretraining_from_shards_resumes_exactly(photo_dir, tmp_path):
    """64 px atto on shards of the test photos: 6 photos x repeat 2 / batch 4 = 3 steps per epoch.
    Stopped after step 2 (mid-epoch) and resumed, it gives the uninterrupted run's losses, across the
    epoch boundary (which reshuffles)."""
    _, pattern = write_shards(photo_dir, tmp_path / "shards", shard_size=2)
    full = Pretrainer(_shard_cfg(tmp_path / "full", pattern, **{"train.max_steps": 4}), "dense",
                      show_progress=False).run()
    losses = [r["loss"] for r in full["history"]]
    assert len(losses) == 4 and all(np.isfinite(losses))
    part = Pretrainer(_shard_cfg(tmp_path / "part", pattern, **{"train.max_steps": 2}), "dense",
                      show_progress=False).run()
    rest = Pretrainer(_shard_cfg(tmp_path / "part", pattern, **{"train.max_steps": 4}), "dense",
                      resume=part["checkpoint"], show_progress=False).run()
    assert [r["loss"] for r in part["history"] + rest["history"]] == losses


@pytest.mark.slow
def test_make_shards_then_pretrain_non_square_from_the_cli(photo_dir, tmp_path):
    """tools/make_shards.py, then tools/pretrain.py --data-path PATTERN --img-size 64x96 for 2 steps."""
    proc = run_tool("make_shards.py", str(photo_dir), str(tmp_path / "shards"), "--shard-size", "3")
    pattern = str(tmp_path / "shards" / "train-{000000..000001}.tar")
    assert f"wrote 6 images into 2 shard(s) of up to 3: {pattern}" in proc.stdout
    out = tmp_path / "run"
    proc = run_tool("pretrain.py", "--data-path", pattern, "--img-size", "64x96", "--batch-size", "2",
                    "--output-dir", str(out), "--no-progress", "train.max_steps=2", "model.decoder_dim=64",
                    "train.vis_every=2", "data.num_workers=2")
    assert "| 6 images |" in proc.stdout and "checkpoint: " in proc.stdout
    from PIL import Image

    from mimsparse.train.checkpoint import load_checkpoint

    ckpt = load_checkpoint(out / "checkpoint-0000002.pth")
    assert ckpt["config"]["data"]["img_size"] == "64x96" and ckpt["run"]["step"] == 2
    with Image.open(out / "vis" / "step-0000002.png") as grid:  # columns of 96 px panels with 4 px gaps
        assert (grid.width - 4) % (96 + 4) == 0 and grid.width > 2 * (96 + 4)
    bad = run_tool("pretrain.py", "--data", pattern, "--no-progress", "data.num_workers=3",
                   "--output-dir", str(tmp_path / "bad"), "--batch-size", "2", check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error: 2 shard(s) for 1 process(es) x 3 loader worker(s)")
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr


@pytest.mark.slow
def test_two_processes_with_two_workers_each_train_from_shards(photo_dir, tmp_path):
    """torchrun, 2 processes x data.num_workers=2 on 6 shards: both ranks get the same
    number of batches (no process waits in a collective), the replicas stay equal (checked by the
    trainer after each epoch), rank 0 writes the checkpoint."""
    import json

    from tests.test_distributed import _torchrun

    _, pattern = write_shards(photo_dir, tmp_path / "shards", shard_size=1)  # 6 shards for 4 workers
    out = tmp_path / "run"
    _torchrun(2, "--no-progress", "--data", pattern, *tiny_overrides(out, **{"train.batch_size": 2,
                                                                            "data.num_workers": 2,
                                                                            "train.epochs": 2}))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    # 6 photos x repeat 2 / (2 processes x batch 2) = 3 steps per epoch, 2 epochs
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6] and all(np.isfinite(r["loss"]) for r in log)
    assert (out / "checkpoint-0000006.pth").is_file()
