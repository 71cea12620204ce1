"""Images -> augmented tensors. Sources: an ImageFolder / flat folder, the real photos that ship
inside scikit-image (so the demo needs no download), or a built-in labelled dataset's training
images (:mod:`mimsparse.evaluate.datasets`; labels unused)."""
from __future__ import annotations
from mimsparse.errors import DataError

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms

from mimsparse.errors import DataError, UnreadableImage

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Colour photographs bundled in the scikit-image wheel (files in skimage/data, no download).
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg",
                  "retina.jpg", "ihc.png", "motorcycle_left.png", "motorcycle_right.png", "color.png")


def bundled_photo_paths() -> list[Path]:
    try:
        import skimage.data
    except ImportError as e:
        raise DataError("the bundled photos come from scikit-image: pip install scikit-image, or pass --data DIR") from e
    root = Path(skimage.data.__file__).parent
    paths = [root / name for name in SKIMAGE_PHOTOS if (root / name).is_file()]
    if not paths:
        raise DataError(f"no photos found in {root}; pass --data DIR")
    return paths


def list_images(root: str | Path) -> list[Path]:
    """All image files below ``root`` (an ImageFolder's class folders or a flat folder), sorted."""
    root = Path(root)
    if root.is_file():
        raise DataError(f"--data {str(root)!r} is a file; pass a folder of images (an ImageFolder or a flat folder), "
                        f"e.g. the folder that holds it: --data {str(root.parent)!r}")
    if not root.is_dir():
        raise DataError(f"data folder {str(root)!r} does not exist; pass --data with a folder of images")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise DataError(f"data folder {str(root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return paths


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB.

    - grayscale ("L", "1") is repeated over the three channels;
    - transparency ("RGBA", "LA", "PA", palette with a transparent colour) is composited on black;
    - 16-bit grayscale ("I;16*") keeps its appearance: 0..65535 maps linearly to 0..255 (value / 257);
      32-bit integer ("I") likewise when its values lie in 0..65535, and float ("F") when they lie in 0..1;
      other ranges are stretched min..max -> 0..255. 16-bit RGB(A) files are read by Pillow as 8-bit.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if img.mode.startswith("I;16") or (img.mode == "I" and lo >= 0 and hi <= 65535):
            arr = arr / 257.0
        elif img.mode == "F" and lo >= 0 and hi <= 1:
            arr = arr * 255.0
        else:
            arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", img.size, (0, 0, 0))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def read_image_file(path: str | Path) -> Image.Image:
    """An image file as 8-bit RGB. Raises :class:`UnreadableImage` for any failure to read it: Pillow
    raises many types for bad files (OSError, SyntaxError, struct.error, DecompressionBombError for
    images over Pillow's pixel limit, MemoryError ...), and each must only skip that image (the data
    loader counts it), never end the run."""
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except Exception as e:  # noqa: BLE001 (user data: every failure is this file's)
        raise UnreadableImage(f"{path}: {type(e).__name__}: {e}") from e


def pretrain_transform(img_size: int | tuple[int, int], min_scale: float) -> transforms.Compose:
    """RandomResizedCrop to ``img_size`` (N, or (H, W) for non-square crops), flip, normalise. The
    crop's aspect ratios (3/4 to 4/3) are taken around the target's W/H, so an HxW crop is not squeezed."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    ratio = (3 / 4 * w / h, 4 / 3 * w / h)
    return transforms.Compose([
        transforms.RandomResizedCrop((h, w), scale=(min_scale, 1.0), ratio=ratio,
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class FileSource:
    """Image files as an image source: ``image(i)`` opens the i-th file as RGB."""

    def __init__(self, paths: list[Path]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, index: int) -> Image.Image:
        return read_image_file(self.paths[index])

    def describe(self, index: int) -> str:
        return str(self.paths[index])


class SeededImages(Dataset):
    """Images from a source (anything with ``len()`` and ``image(i) -> PIL RGB``), indexed by
    (index, seed): each sample's augmentation draws from its own seeded generator, so a run is
    reproducible whatever the worker count, and resumable. Returns (image [3, H, W], seed); the seed
    also keys the sample's mask in the engine. A corrupt or truncated file yields None (the collate
    function drops it and counts it)."""

    def __init__(self, source, transform):
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item):
        index, seed = item
        try:
            img = self.source.image(index)
        except UnreadableImage as e:
            warnings.warn(f"skipping unreadable image {e}")
            return None
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            where = self.source.describe(index) if hasattr(self.source, "describe") else f"image {index}"
            warnings.warn(f"skipping unreadable image {where}: {e}")
            return None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(img), seed


def collate_skip_bad(batch):
    """-> (images [B, 3, H, W], seeds int64 [B], number of unreadable samples dropped)."""
    good = [x for x in batch if x is not None]
    images = torch.stack([img for img, _ in good]) if good else torch.empty(0)
    seeds = torch.tensor([seed for _, seed in good], dtype=torch.int64)
    return images, seeds, len(batch) - len(good)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed Python's and NumPy's generators from the worker's torch seed
    (torch's own is seeded per worker by the DataLoader; per-sample draws are re-seeded anyway)."""
    import random

    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


class EpochSampler(torch.utils.data.Sampler):
    """Yields (index, augmentation seed) for one epoch: a permutation of ``repeat`` passes over the
    data drawn from (seed, epoch).

    Several processes: the epoch is first cut to a whole number of global batches
    (``world_size * batch_size`` items; pass batch_size x accumulation steps), then rank r takes items
    r, r + world_size, ...; so every rank yields the same number of full batches, and global batch k
    holds the same items as batch k of one process with world_size times the batch. ``start`` skips
    that many of this rank's items (mid-epoch resume)."""

    def __init__(self, num_items: int, seed: int, epoch: int, repeat: int = 1, start: int = 0,
                 rank: int = 0, world_size: int = 1, batch_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(num_items * repeat, generator=g) % num_items
        seeds = torch.randint(0, 2**62, (len(order),), generator=g)
        usable = len(order) // (world_size * batch_size) * (world_size * batch_size)
        pairs = list(zip(order[:usable].tolist(), seeds[:usable].tolist()))
        self.items = pairs[rank::world_size][start:]

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)
