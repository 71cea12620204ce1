"""Labelled image sources: an ImageFolder, or real labelled data that ships with a package here (no
download). Each source is a list of images and integer labels with class names; pretraining uses
only the images, finetuning and the linear probe the labels too.

Built-in names (``--data NAME``; ``split`` = train | test):

| name               | from                                            | classes | train / test        |
|--------------------|-------------------------------------------------|---------|---------------------|
| fashion-mnist      | Debian ``dataset-fashion-mnist`` (IDX files)    | 10      | 60000 / 10000 28x28 |
| lfw-subset         | scikit-image ``data.lfw_subset`` (face/no face) | 2       | 150 / 50 25x25      |
| foolbox-imagenet   | the foolbox wheel's ImageNet samples            | 1000    | 20 / the same 20    |

Small images are resized by the transforms to the size the config states (a multiple of 32).
"""
from __future__ import annotations

import gzip
import importlib.util
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mimsparse.train.data import DataError, list_images, to_rgb

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                         "bag", "ankle boot")
SPLITS = ("train", "test")


@dataclass
class LabelledImages:
    """images: uint8 array [N, H, W] (gray) or [N, H, W, 3], or a list of file paths; labels: int64 [N]."""

    images: np.ndarray | list[Path]
    labels: torch.Tensor
    classes: tuple[str, ...]
    name: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> Image.Image:
        """The index-th image as 8-bit RGB (files are opened here; OSError if unreadable)."""
        item = self.images[index]
        if isinstance(item, Path):
            with Image.open(item) as img:
                img.load()
                return to_rgb(img)
        return to_rgb(Image.fromarray(item))

    def subset(self, indices) -> "LabelledImages":
        indices = [int(i) for i in indices]
        images = self.images[indices] if isinstance(self.images, np.ndarray) else [self.images[i] for i in indices]
        return LabelledImages(images, self.labels[indices], self.classes, self.name)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format, optionally gzipped) -> uint8 array with the stored shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; a cut-off gzip stream raises EOFError
        raise DataError(f"{path} cannot be read ({type(e).__name__}: {e})") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{path} is truncated: its header is cut off")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: header says {shape}, found {body.size} values")
    return body.reshape(shape)


def fashion_mnist(split: str, root: Path = FASHION_MNIST_DIR) -> LabelledImages:
    prefix = {"train": "train", "test": "t10k"}[split]
    images_path = root / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = root / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_path.is_file() or not labels_path.is_file():
        raise DataError(f"Fashion-MNIST not found in {root}; install it with "
                        f"`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or pass --data DIR")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if len(images) != len(labels):
        raise DataError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    return LabelledImages(images, torch.from_numpy(labels.astype(np.int64)), FASHION_MNIST_CLASSES, "fashion-mnist")


def lfw_subset(split: str) -> LabelledImages:
    """scikit-image's 200 grayscale 25x25 crops: the first 100 are faces, the next 100 are not. A fixed
    seeded split keeps 75 of each class for train and 25 for test."""
    try:
        from skimage.data import lfw_subset as load
    except ImportError as e:
        raise DataError("lfw-subset comes from scikit-image: pip install scikit-image") from e
    images = np.clip(np.rint(load() * 255), 0, 255).astype(np.uint8)
    labels = torch.tensor([0] * 100 + [1] * 100)
    order = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    per_class = order[:75] if split == "train" else order[75:]
    indices = torch.cat([per_class, per_class + 100]).tolist()
    return LabelledImages(images[indices], labels[indices], ("face", "not face"), "lfw-subset")


def foolbox_imagenet(split: str) -> LabelledImages:
    """The 20 labelled ImageNet photos in the foolbox wheel (label in the file name,
    imagenet_<i>_<label>.jpg); too few to split, so train and test are the same 20 images."""
    # find the package without importing it: installed with --no-deps, `import foolbox` fails (no eagerpy)
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("foolbox-imagenet comes from the foolbox wheel: pip install --no-deps foolbox==3.3.4")
    paths = sorted((Path(spec.submodule_search_locations[0]) / "data").glob("imagenet_*_*.jpg"))
    if not paths:
        raise DataError("the installed foolbox has no data/imagenet_*.jpg samples; install foolbox==3.3.4")
    labels = torch.tensor([int(p.stem.rsplit("_", 1)[1]) for p in paths])
    return LabelledImages(paths, labels, tuple(str(i) for i in range(1000)), "foolbox-imagenet")


def image_folder(root: Path, split: str) -> LabelledImages:
    """ImageFolder layout: root/<class>/<image>, or root/<split>/<class>/<image> when split folders exist."""
    if (root / split).is_dir():
        root = root / split
    elif any((root / s).is_dir() for s in SPLITS):
        raise DataError(f"{root} has split folders but no {split!r}; expected {root}/{split}/<class>/<image>")
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir())) if root.is_dir() else ()
    if not classes:
        raise DataError(f"{root} has no class folders; expected {root}/<class>/<image> (ImageFolder layout)")
    paths = list_images(root)
    index = {c: i for i, c in enumerate(classes)}
    labels = [index.get(p.relative_to(root).parts[0]) for p in paths]
    if None in labels:
        stray = paths[labels.index(None)]
        raise DataError(f"{stray} is not inside a class folder of {root}; move it into {root}/<class>/")
    return LabelledImages(paths, torch.tensor(labels), classes, str(root))


BUILTIN = {"fashion-mnist": fashion_mnist, "lfw-subset": lfw_subset, "foolbox-imagenet": foolbox_imagenet}


def is_builtin(spec: str) -> bool:
    return spec in BUILTIN


def load_labelled(spec: str, split: str = "train") -> LabelledImages:
    """``spec``: a built-in name (see the module docstring) or an ImageFolder path."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if spec in BUILTIN:
        return BUILTIN[spec](split)
    path = Path(spec)
    if not path.exists():
        raise DataError(f"--data {spec!r} is neither a folder nor a built-in dataset ({', '.join(BUILTIN)})")
    return image_folder(path, split)
