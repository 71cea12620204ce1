"""Images -> augmented tensors. Sources: an ImageFolder / flat folder, or the real photos that ship
inside scikit-image (so the demo needs no download)."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Colour photographs bundled in the scikit-image wheel (files in skimage/data, no download).
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg",
                  "retina.jpg", "ihc.png", "motorcycle_left.png", "motorcycle_right.png", "color.png")


class DataError(ValueError):
    pass


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
    if not root.is_dir():
        raise DataError(f"data folder {str(root)!r} does not exist; pass --data with a folder of images")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise DataError(f"data folder {str(root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return paths


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, RGBA, palette and 16-bit/float images -> 8-bit RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.astype(np.uint8))
    if img.mode == "RGBA" or img.mode == "LA" or (img.mode == "P" and "transparency" in img.info):
        background = Image.new("RGB", img.size, (0, 0, 0))
        rgba = img.convert("RGBA")
        background.paste(rgba, mask=rgba.split()[-1])
        return background
    return img.convert("RGB")


def pretrain_transform(img_size: int, min_scale: float) -> transforms.Compose:
    return transforms.Compose([
        transforms.RandomResizedCrop(img_size, scale=(min_scale, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class ImageFiles(Dataset):
    """Images from a list of files. Indexed by (index, seed): each sample's augmentation draws from
    its own seeded generator, so a run is reproducible whatever the worker count, and resumable.
    A corrupt or truncated file yields None (the collate function drops it and counts it)."""

    def __init__(self, paths: list[Path], transform):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item):
        index, seed = item
        path = self.paths[index]
        try:
            with Image.open(path) as img:
                img.load()
                img = to_rgb(img)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            warnings.warn(f"skipping unreadable image {path}: {e}")
            return None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(img)


def collate_skip_bad(batch):
    """Stack the good samples; report how many were dropped."""
    good = [x for x in batch if x is not None]
    images = torch.stack(good) if good else torch.empty(0)
    return images, len(batch) - len(good)


class EpochSampler(torch.utils.data.Sampler):
    """Yields (index, augmentation seed) for one epoch: a permutation of ``repeat`` passes over the
    data drawn from (seed, epoch), starting after ``start`` samples (mid-epoch resume)."""

    def __init__(self, num_items: int, seed: int, epoch: int, repeat: int = 1, start: int = 0,
                 rank: int = 0, world_size: int = 1):
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(num_items * repeat, generator=g) % num_items
        seeds = torch.randint(0, 2**62, (len(order),), generator=g)
        pairs = list(zip(order.tolist(), seeds.tolist()))
        self.items = pairs[rank::world_size][start:]

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)
