"""Registry entries on tiny files written in torchvision's on-disk layouts (no network, no real data needed)."""
import gzip
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
from omegaconf import OmegaConf
from PIL import Image

import kdrun.data.mnist as mnist_module
from kdrun.data import DATASETS, FolderData, ImageData, load_dataset, make_loaders
from kdrun.errors import ConfigError

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def load(**cfg):
    return load_dataset(OmegaConf.create({"download": False, **cfg}))


# ---------------------------------------------------------------- IDX (MNIST family)

def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX format: big-endian magic (2051 images, 2049 labels), big-endian dims, then uint8 data."""
    magic = {3: 2051, 1: 2049}[array.ndim]
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def tiny_idx(n_train=6, n_test=4, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test, dtype=np.uint8) + 3) % 10,
    }


def write_idx(folder: Path, arrays: dict, gz: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        if gz:
            with gzip.open(folder / f"{name}.gz", "wb") as f:
                f.write(idx_bytes(array))
        else:
            (folder / name).write_bytes(idx_bytes(array))


def check_idx(data: ImageData, arrays: dict, mean: float, std: float) -> None:
    assert data.train_images.shape == (6, 1, 28, 28) and data.test_images.shape == (4, 1, 28, 28)
    assert data.train_images.dtype == torch.uint8 and data.train_labels.dtype == torch.int64
    assert np.array_equal(data.train_images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(data.test_images[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert data.train_labels.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert data.test_labels.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert data.num_classes == 10 and data.in_channels == 1
    assert data.mean == (mean,) and data.std == (std,)
    assert data.crop_padding == 2 and data.hflip is False


@pytest.fixture
def no_debian(monkeypatch, tmp_path):
    """Point the Debian directory at an empty place so this machine's real files stay out of the test."""
    monkeypatch.setattr(mnist_module, "DEBIAN_FASHION_DIR", tmp_path / "no-debian-here")


def test_mnist_from_raw_idx_with_tilde_root(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    arrays = tiny_idx()
    write_idx(tmp_path / "data" / "MNIST" / "raw", arrays)
    check_idx(load(name="mnist", root="~/data"), arrays, 0.1307, 0.3081)


def test_fashion_mnist_from_raw_idx(tmp_path, no_debian):
    arrays = tiny_idx(seed=1)
    write_idx(tmp_path / "FashionMNIST" / "raw", arrays)
    check_idx(load(name="fashion_mnist", root=str(tmp_path)), arrays, 0.2860, 0.3530)


def test_fashion_mnist_found_in_debian_directory(tmp_path, monkeypatch):
    debian = tmp_path / "debian"
    arrays = tiny_idx(seed=2)
    write_idx(debian, arrays, gz=True)
    monkeypatch.setattr(mnist_module, "DEBIAN_FASHION_DIR", debian)
    root = tmp_path / "root"  # does not exist yet
    data = load(name="fashion_mnist", root=str(root))
    raw = root / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(IDX_NAMES)  # torchvision's layout, no temp files
    check_idx(data, arrays, 0.2860, 0.3530)
    # Already prepared: a second load reads root and leaves the files alone.
    stamps = {p.name: p.stat().st_mtime_ns for p in raw.iterdir()}
    check_idx(load(name="fashion_mnist", root=str(root)), arrays, 0.2860, 0.3530)
    assert stamps == {p.name: p.stat().st_mtime_ns for p in raw.iterdir()}


def test_mnist_root_files_win_over_debian(tmp_path, monkeypatch):
    debian = tmp_path / "debian"
    write_idx(debian, tiny_idx(seed=3), gz=True)
    monkeypatch.setattr(mnist_module, "DEBIAN_FASHION_DIR", debian)
    arrays = tiny_idx(seed=4)
    write_idx(tmp_path / "root" / "FashionMNIST" / "raw", arrays)
    check_idx(load(name="fashion_mnist", root=str(tmp_path / "root")), arrays, 0.2860, 0.3530)


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_idx_missing_root_is_a_config_error(tmp_path, no_debian, name, folder):
    with pytest.raises(ConfigError) as err:
        load(name=name, root=str(tmp_path / "nowhere"))
    message = str(err.value)
    assert "\n" not in message
    assert f"dataset.root={tmp_path / 'nowhere'}" in message
    assert f"{folder}/raw/" in message and "dataset.download=true" in message


def test_idx_corrupt_file_is_a_config_error(tmp_path):
    arrays = tiny_idx()
    raw = tmp_path / "MNIST" / "raw"
    write_idx(raw, arrays)
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:500])  # truncated
    with pytest.raises(ConfigError, match=r"^dataset\.root=.* corrupt MNIST files"):
        load(name="mnist", root=str(tmp_path))


def test_idx_unset_root_is_a_config_error():
    with pytest.raises(ConfigError, match="dataset.root is not set"):
        load(name="mnist", root=None)


REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (REAL_FASHION / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_from_debian(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist_module, "DEBIAN_FASHION_DIR", REAL_FASHION)
    data = load(name="fashion_mnist", root=str(tmp_path))
    assert data.train_images.shape == (60000, 1, 28, 28) and data.test_images.shape == (10000, 1, 28, 28)
    assert data.num_classes == 10
    assert torch.bincount(data.train_labels).tolist() == [6000] * 10
    assert torch.bincount(data.test_labels).tolist() == [1000] * 10
    # the published statistics match the data
    x = data.train_images.float() / 255
    assert abs(x.mean().item() - 0.2860) < 1e-3 and abs(x.std().item() - 0.3530) < 1e-3


# ---------------------------------------------------------------- CIFAR

def unchecked(monkeypatch, cls):
    """torchvision md5-checks the CIFAR files; a tiny fake copy needs the md5s set to None."""
    monkeypatch.setattr(cls, "train_list", [[name, None] for name, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[name, None] for name, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": None})


def cifar_batch(n, label_key, num_classes, seed):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    return {"data": data, label_key: [int(v) for v in rng.integers(0, num_classes, n)]}


def dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar10(root: Path) -> dict:
    folder = root / "cifar-10-batches-py"
    batches = {f"data_batch_{k}": cifar_batch(2, "labels", 10, k) for k in range(1, 6)}
    batches["test_batch"] = cifar_batch(3, "labels", 10, 9)
    # A marker pixel: image 1 of data_batch_2 (train index 3), channel 2 (blue), row 5, column 7.
    batches["data_batch_2"]["data"][1, 2 * 1024 + 5 * 32 + 7] = 0
    batches["data_batch_2"]["data"][1, 2 * 1024 + 5 * 32 + 8] = 255
    for name, batch in batches.items():
        dump(folder / name, batch)
    dump(folder / "batches.meta", {"label_names": [f"class{k}" for k in range(10)]})
    return batches


def test_cifar10_from_pickles_in_chw_order(tmp_path, monkeypatch):
    unchecked(monkeypatch, tvd.CIFAR10)
    batches = write_cifar10(tmp_path)
    data = load(name="cifar10", root=str(tmp_path))
    assert data.train_images.shape == (10, 3, 32, 32) and data.test_images.shape == (3, 3, 32, 32)
    assert data.train_images.dtype == torch.uint8 and data.train_images.is_contiguous()
    assert data.train_images[3, 2, 5, 7] == 0 and data.train_images[3, 2, 5, 8] == 255
    expected = np.concatenate([batches[f"data_batch_{k}"]["data"] for k in range(1, 6)]).reshape(10, 3, 32, 32)
    assert np.array_equal(data.train_images.numpy(), expected)
    assert np.array_equal(data.test_images.numpy(), batches["test_batch"]["data"].reshape(3, 3, 32, 32))
    assert data.train_labels.tolist() == sum((batches[f"data_batch_{k}"]["labels"] for k in range(1, 6)), [])
    assert data.test_labels.tolist() == batches["test_batch"]["labels"]
    assert data.train_labels.dtype == torch.int64
    assert data.num_classes == 10 and data.in_channels == 3
    assert data.mean == (0.4914, 0.4822, 0.4465) and data.std == (0.2470, 0.2435, 0.2616)
    assert data.crop_padding == 4 and data.hflip is True


def test_cifar100_from_pickles(tmp_path, monkeypatch):
    unchecked(monkeypatch, tvd.CIFAR100)
    folder = tmp_path / "cifar-100-python"
    train, test = cifar_batch(4, "fine_labels", 100, 0), cifar_batch(2, "fine_labels", 100, 1)
    train["data"][2, 1 * 1024 + 31 * 32 + 0] = 0
    train["data"][2, 1 * 1024 + 0 * 32 + 31] = 255
    dump(folder / "train", train)
    dump(folder / "test", test)
    dump(folder / "meta", {"fine_label_names": [f"c{k}" for k in range(100)]})
    data = load(name="cifar100", root=str(tmp_path))
    assert data.train_images.shape == (4, 3, 32, 32) and data.test_images.shape == (2, 3, 32, 32)
    assert data.train_images[2, 1, 31, 0] == 0 and data.train_images[2, 1, 0, 31] == 255
    assert np.array_equal(data.train_images.numpy(), train["data"].reshape(4, 3, 32, 32))
    assert data.train_labels.tolist() == train["fine_labels"] and data.test_labels.tolist() == test["fine_labels"]
    assert data.num_classes == 100
    assert data.mean == (0.5071, 0.4865, 0.4409) and data.std == (0.2673, 0.2564, 0.2762)


@pytest.mark.parametrize("name, folder, files", [("cifar10", "cifar-10-batches-py", "data_batch_1..5, test_batch"),
                                                 ("cifar100", "cifar-100-python", "train, test, meta")])
def test_cifar_missing_root_is_a_config_error(tmp_path, name, folder, files):
    with pytest.raises(ConfigError) as err:
        load(name=name, root=str(tmp_path / "x"))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"dataset.root={tmp_path / 'x'} has no CIFAR-1")
    assert f"{tmp_path / 'x'}/{folder}/{files}" in message and "dataset.download=true" in message


def test_cifar_partial_files_are_a_config_error(tmp_path, monkeypatch):
    unchecked(monkeypatch, tvd.CIFAR10)
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(ConfigError, match=r"^dataset\.root=.* has no CIFAR-10 files"):
        load(name="cifar10", root=str(tmp_path))


def test_cifar_md5_mismatch_is_a_config_error(tmp_path):
    write_cifar10(tmp_path)  # torchvision's real md5 list: these tiny files fail it
    with pytest.raises(ConfigError) as err:
        load(name="cifar10", root=str(tmp_path))
    assert str(err.value).startswith(f"dataset.root={tmp_path} has missing or corrupt CIFAR-10 files")
    assert "torchvision: Dataset not found or corrupted" in str(err.value)


# ---------------------------------------------------------------- image folder

def write_folder(root: Path, classes=("cat", "dog", "emu"), per_class=(3, 2),
                 sizes=((20, 12), (40, 40), (9, 30))) -> None:
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "val"), per_class):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for k in range(count):
                h, w = sizes[k % len(sizes)]
                mode = "L" if k == 1 else "RGB"  # grey images are converted to RGB by ImageFolder's loader
                shape = (h, w) if mode == "L" else (h, w, 3)
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / split / c / f"{k}.png")


def test_imagefolder_batches(tmp_path):
    write_folder(tmp_path)
    data = load(name="imagefolder", root=str(tmp_path), image_size=16, workers=0)
    assert isinstance(data, FolderData)
    assert data.num_classes == 3 and data.in_channels == 3 and data.image_shape == (3, 16, 16)
    assert data.mean == (0.485, 0.456, 0.406) and data.std == (0.229, 0.224, 0.225)
    train, test = make_loaders(data, batch_size=4, device="cpu", seed=0, eval_batch_size=4)
    assert train.num_samples == 9 and test.num_samples == 6
    assert len(train) == 3 and len(test) == 2
    x, y, i = next(iter(train))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert y.dtype == torch.int64 and i.dtype == torch.int64 and y.device.type == "cpu"
    assert torch.equal(y, train.labels[i])
    seen = torch.cat([b[2] for b in train])
    assert sorted(seen.tolist()) == list(range(9))
    # test: ordered, deterministic (resize + center crop), every sample once
    first, second = list(test), list(test)
    assert torch.equal(torch.cat([b[2] for b in first]), torch.arange(6))
    assert torch.equal(torch.cat([b[1] for b in first]), torch.tensor([0, 0, 1, 1, 2, 2]))
    for a, b in zip(first, second):
        assert torch.equal(a[0], b[0])


def folder_epochs(data, seed):
    train, _ = make_loaders(data, batch_size=4, device="cpu", seed=seed)
    return [[(x.clone(), i.clone()) for x, _, i in train] for _ in range(2)]


def same(a, b):
    return all(torch.equal(xa, xb) and torch.equal(ia, ib)
               for ea, eb in zip(a, b) for (xa, ia), (xb, ib) in zip(ea, eb))


@pytest.mark.parametrize("workers", [0, 2])
def test_imagefolder_reproducible_from_seed(tmp_path, workers):
    write_folder(tmp_path)
    data = load(name="imagefolder", root=str(tmp_path), image_size=16, workers=workers, crop="resized")
    a, b, c = folder_epochs(data, 1), folder_epochs(data, 1), folder_epochs(data, 2)
    assert same(a, b)
    assert not same(a, c)
    assert not same([a[0]], [a[1]])  # a new epoch draws new order and augmentation


def test_imagefolder_without_augmentation_matches_test_view(tmp_path):
    write_folder(tmp_path, per_class=(3, 0), sizes=((20, 20), (40, 40), (9, 9)))  # square images
    shutil.rmtree(tmp_path / "val")
    shutil.copytree(tmp_path / "train", tmp_path / "val")  # val: the same images as train
    data = load(name="imagefolder", root=str(tmp_path), image_size=16, workers=0, crop_padding=0, hflip=False)
    train, test = make_loaders(data, batch_size=9, device="cpu", seed=0, eval_batch_size=9)
    (x, _, i), = list(train)
    (xt, _, it), = list(test)
    assert torch.allclose(x, xt[i])  # pad crop without padding on a resized square = center crop
    assert x.abs().max() < 3  # normalised


def test_imagefolder_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="dataset.root is not set"):
        load(name="imagefolder", root=None)
    with pytest.raises(ConfigError, match=r"^dataset\.root=.*/nowhere has no train/ folder"):
        load(name="imagefolder", root=str(tmp_path / "nowhere"))
    (tmp_path / "a" / "train").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"^dataset\.root=.* has no val/ folder"):
        load(name="imagefolder", root=str(tmp_path / "a"))
    (tmp_path / "a" / "val").mkdir()
    with pytest.raises(ConfigError, match=r"^dataset\.root=.* has no usable images in train/"):
        load(name="imagefolder", root=str(tmp_path / "a"))
    write_folder(tmp_path / "b")
    (tmp_path / "b" / "val" / "cat").rename(tmp_path / "b" / "val" / "cow")
    with pytest.raises(ConfigError, match=r"^dataset\.root=.*same class folders.*only in train: \['cat'\]"):
        load(name="imagefolder", root=str(tmp_path / "b"))
    write_folder(tmp_path / "c")
    for key, value in (("mean", [0.5, 0.5]), ("std", [0.2, 0, 0.2]), ("crop", "zoom"), ("image_size", 0),
                       ("workers", -1)):
        with pytest.raises(ConfigError, match=rf"^dataset\.{key}="):
            load(name="imagefolder", root=str(tmp_path / "c"), **{key: value})


# ---------------------------------------------------------------- registry and configs

CONF = Path(__file__).resolve().parents[1] / "conf" / "dataset"


@pytest.mark.parametrize("name", ["digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagefolder"])
def test_registered_with_config_file(name):
    assert name in DATASETS and DATASETS.describe(name) and "\n" not in DATASETS.describe(name)
    path = CONF / f"{name}.yaml"
    assert path.read_text().startswith("# ")
    cfg = OmegaConf.load(path)
    assert cfg.name == name and "root" in cfg
    if name in ("mnist", "fashion_mnist", "cifar10", "cifar100"):
        assert cfg.root == "~/.cache/kdrun/data" and cfg.download is False
    else:
        assert cfg.root is None
