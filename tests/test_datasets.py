"""Labelled sources (mimsparse/datasets.py): IDX files, ImageFolder layouts, the built-in datasets."""
import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from mimsparse.train.data import DataError
from mimsparse.evaluate.datasets import FASHION_MNIST_DIR, fashion_mnist, image_folder, load_labelled, read_idx


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX by hand: two zero bytes, type 0x08 (unsigned byte), number of dimensions, big-endian uint32 sizes."""
    return struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


# ---- IDX ------------------------------------------------------------------------------------------
def test_read_idx_plain_and_gzip(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a-idx3-ubyte").write_bytes(idx_bytes(array))
    with gzip.open(tmp_path / "a-idx3-ubyte.gz", "wb") as f:
        f.write(idx_bytes(array))
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        got = read_idx(tmp_path / name)
        assert got.dtype == np.uint8 and got.shape == (2, 3, 4) and np.array_equal(got, array)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    (tmp_path / "l-idx1-ubyte").write_bytes(idx_bytes(labels))
    assert read_idx(tmp_path / "l-idx1-ubyte").tolist() == [3, 1, 4, 1, 5]


def test_read_idx_refuses_broken_files(tmp_path):
    good = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    cases = {
        "float-idx": (good[:2] + b"\x0d" + good[3:], "bad magic number"),  # 0x0D = float32 elements
        "nonzero-idx": (b"\x01" + good[1:], "bad magic number"),
        "tiny-idx": (good[:3], "bad magic number"),
        "body-idx": (good[:-5], r"truncated: header says \(2, 3, 4\), found 19 values"),
        "header-idx": (good[:9], "header is cut off"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=message):
            read_idx(tmp_path / name)
    compressed = gzip.compress(good)
    (tmp_path / "cut.gz").write_bytes(compressed[:len(compressed) // 2])
    (tmp_path / "notgzip.gz").write_bytes(good)
    for name in ("cut.gz", "notgzip.gz"):
        with pytest.raises(DataError, match="cannot be read"):
            read_idx(tmp_path / name)


def test_fashion_mnist_layout_from_small_files(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    labels = np.array([0, 9, 3, 3, 1, 0], dtype=np.uint8)
    for name, array in (("t10k-images-idx3-ubyte.gz", images), ("t10k-labels-idx1-ubyte.gz", labels)):
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(idx_bytes(array))
    test = fashion_mnist("test", root=tmp_path)
    assert len(test) == 6 and test.labels.tolist() == labels.tolist() and test.classes[9] == "ankle boot"
    img = test.image(1)
    assert img.mode == "RGB" and img.size == (28, 28)
    assert np.array_equal(np.asarray(img)[..., 0], images[1])  # gray repeated over the channels
    with pytest.raises(DataError, match="Fashion-MNIST not found .*apt-get install dataset-fashion-mnist"):
        fashion_mnist("train", root=tmp_path)
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(idx_bytes(labels[:5]))
    with pytest.raises(DataError, match="has 6 images but .* has 5 labels"):
        fashion_mnist("test", root=tmp_path)


@pytest.mark.skipif(not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason=f"Fashion-MNIST is not installed in {FASHION_MNIST_DIR} "
                           f"(apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_real_files():
    train, test = load_labelled("fashion-mnist", "train"), load_labelled("fashion-mnist", "test")
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert len(train.classes) == 10 and train.labels.dtype == torch.int64
    assert torch.bincount(train.labels).tolist() == [6000] * 10  # balanced, labels 0..9
    assert torch.bincount(test.labels).tolist() == [1000] * 10


# ---- ImageFolder ----------------------------------------------------------------------------------
def save_image(path, value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 6), value).save(path)


def test_image_folder_with_class_folders(tmp_path):
    for rel in ("cat/1.png", "cat/2.jpg", "dog/a.png", "dog/sub/b.png", "zebra/z.bmp"):
        save_image(tmp_path / rel)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    data = image_folder(tmp_path, "train")
    assert data.classes == ("cat", "dog", "zebra")
    assert data.labels.tolist() == [0, 0, 1, 1, 2]  # a nested folder belongs to its class folder
    assert data.image(2).mode == "RGB" and data.image(2).size == (8, 6)
    # without split folders both splits read the same images
    assert load_labelled(str(tmp_path), "test").labels.tolist() == [0, 0, 1, 1, 2]
    sub = data.subset([4, 0])
    assert sub.labels.tolist() == [2, 0] and sub.classes == data.classes and sub.images[0].name == "z.bmp"


def test_image_folder_with_split_folders(tmp_path):
    for rel in ("train/a/1.png", "train/a/2.png", "train/b/3.png", "test/a/4.png", "test/b/5.png", "test/b/6.png"):
        save_image(tmp_path / rel)
    train, test = load_labelled(str(tmp_path), "train"), load_labelled(str(tmp_path), "test")
    assert (train.labels.tolist(), test.labels.tolist()) == ([0, 0, 1], [0, 1, 1])
    assert [p.name for p in test.images] == ["4.png", "5.png", "6.png"]


def test_image_folder_errors(tmp_path):
    save_image(tmp_path / "stray" / "a" / "1.png")
    save_image(tmp_path / "stray" / "loose.png")
    with pytest.raises(DataError, match="loose.png is not inside a class folder"):
        image_folder(tmp_path / "stray", "train")
    save_image(tmp_path / "split" / "train" / "a" / "1.png")
    with pytest.raises(DataError, match="has split folders but no 'test'"):
        image_folder(tmp_path / "split", "test")
    (tmp_path / "flat").mkdir()
    save_image(tmp_path / "flat" / "1.png")
    with pytest.raises(DataError, match="has no class folders"):
        image_folder(tmp_path / "flat", "train")


def test_load_labelled_errors(tmp_path):
    with pytest.raises(DataError, match="'imagenet-22k' is neither a folder nor a built-in dataset.*fashion-mnist"):
        load_labelled("imagenet-22k")
    with pytest.raises(DataError, match="split must be one of train, test"):
        load_labelled("lfw-subset", "val")


# ---- built-in -------------------------------------------------------------------------------------
def test_lfw_subset_split():
    from skimage.data import lfw_subset

    originals = np.clip(np.rint(lfw_subset() * 255), 0, 255).astype(np.uint8)
    index = {img.tobytes(): i for i, img in enumerate(originals)}  # the 200 crops are distinct
    train, test = load_labelled("lfw-subset", "train"), load_labelled("lfw-subset", "test")
    assert (len(train), len(test)) == (150, 50) and train.classes == ("face", "not face")
    assert torch.bincount(train.labels).tolist() == [75, 75] and torch.bincount(test.labels).tolist() == [25, 25]
    train_ids = [index[img.tobytes()] for img in train.images]
    test_ids = [index[img.tobytes()] for img in test.images]
    assert not set(train_ids) & set(test_ids) and sorted(train_ids + test_ids) == list(range(200))
    for ids, data in ((train_ids, train), (test_ids, test)):  # the first 100 crops are the faces
        assert data.labels.tolist() == [0 if i < 100 else 1 for i in ids]
    assert train.image(0).mode == "RGB" and train.image(0).size == (25, 25)


def test_foolbox_imagenet_labels_come_from_the_file_names():
    import importlib.util

    if importlib.util.find_spec("foolbox") is None:
        pytest.skip("foolbox is not installed (pip install --no-deps foolbox==3.3.4)")
    train, test = load_labelled("foolbox-imagenet", "train"), load_labelled("foolbox-imagenet", "test")
    assert len(train) == 20 and len(train.classes) == 1000 and train.images == test.images
    for path, label in zip(train.images, train.labels.tolist()):
        prefix, _, name_label = path.stem.split("_")
        assert prefix == "imagenet" and label == int(name_label) and 0 <= label < 1000
    assert train.labels[0].item() == 243 and train.images[0].name == "imagenet_00_243.jpg"
    assert train.image(0).mode == "RGB"
