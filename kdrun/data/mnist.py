"""MNIST and Fashion-MNIST through torchvision's own classes (decompressed IDX files in `root/<Class>/raw/`).

`fashion_mnist` also picks up the Debian package `dataset-fashion-mnist` by itself: when `root` lacks the
files and the package's `.gz` files exist, they are decompressed into torchvision's layout first.
"""
from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import torch

from kdrun.data.registry import ImageData, dataset_root, register_dataset, torchvision_splits
from kdrun.errors import ConfigError

# Where `apt-get install dataset-fashion-mnist` puts the gzipped IDX files (tests point this elsewhere).
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
RAW_PATTERN = "{train,t10k}-{images-idx3,labels-idx1}-ubyte"

def _has_files(folder: Path) -> bool:
    """torchvision accepts the raw IDX files or the legacy processed/{training,test}.pt pair."""
    raw = folder / "raw"
    processed = folder / "processed"
    return (all((raw / name).is_file() for name in RAW_FILES)
            or all((processed / name).is_file() for name in ("training.pt", "test.pt")))


def prepare_fashion_from_debian(root: Path, source: Path | None = None) -> bool:
    """Decompress the Debian package's Fashion-MNIST into `root/FashionMNIST/raw/` when it is missing there.

    Returns True when the files were (or already are) in place from this source, False when the Debian
    files are not installed. Writes through a temporary name so an interrupted run leaves no half file.
    """
    source = Path(DEBIAN_FASHION_DIR if source is None else source)
    raw = root / "FashionMNIST" / "raw"
    gz = {name: source / f"{name}.gz" for name in RAW_FILES}
    if not all(path.is_file() for path in gz.values()):
        return False
    raw.mkdir(parents=True, exist_ok=True)
    for name, src in gz.items():
        dest = raw / name
        if dest.is_file():
            continue
        tmp = raw / f".{name}.tmp{os.getpid()}"
        try:
            with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, length=1 << 20)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
    return True


def _load_idx(cfg, cls_name: str, title: str, mean: float, std: float, debian: bool = False) -> ImageData:
    import torchvision.datasets as tvd

    value, root = dataset_root(cfg, f"{title} needs a directory to read (or download) it from")
    download = bool(cfg.get("download", False))
    folder = root / cls_name
    expected = f"expected {folder}/raw/{RAW_PATTERN}"
    if debian and not _has_files(folder):
        try:
            prepare_fashion_from_debian(root)
        except (OSError, EOFError) as err:
            raise ConfigError(f"dataset.root={value}: could not decompress the Debian {title} files from "
                              f"{DEBIAN_FASHION_DIR} into {folder}/raw ({err})") from None
    if not download and not _has_files(folder):
        fixes = ("put them there, set dataset.download=true or install the Debian package dataset-fashion-mnist"
                 if debian else "put them there or set dataset.download=true")
        raise ConfigError(f"dataset.root={value} has no {title} files ({expected}); {fixes}")
    cls = getattr(tvd, cls_name)
    train, test = torchvision_splits(cls, root, value, title, expected, download)
    images = {"train": train.data, "test": test.data}
    labels = {"train": train.targets, "test": test.targets}
    for split in ("train", "test"):
        if images[split].ndim != 3 or len(images[split]) != len(labels[split]) or len(images[split]) == 0:
            raise ConfigError(f"dataset.root={value} has corrupt {title} {split} files ({expected}: "
                              f"{tuple(images[split].shape)} images for {len(labels[split])} labels)")
    return ImageData(images["train"].to(torch.uint8).unsqueeze(1), labels["train"].long(),
                     images["test"].to(torch.uint8).unsqueeze(1), labels["test"].long(),
                     num_classes=len(cls.classes), mean=(mean,), std=(std,), crop_padding=2, hflip=False)


@register_dataset("mnist", "MNIST handwritten digits, 28x28 grey, 10 classes "
                          "(torchvision layout; download=true fetches it)", shape=(1, 28, 28), classes=10)
def load_mnist(cfg) -> ImageData:
    return _load_idx(cfg, "MNIST", "MNIST", mean=0.1307, std=0.3081)


@register_dataset("fashion_mnist", "Fashion-MNIST, 28x28 grey, 10 classes (torchvision layout or the Debian "
                                   "package dataset-fashion-mnist)", shape=(1, 28, 28), classes=10)
def load_fashion_mnist(cfg) -> ImageData:
    return _load_idx(cfg, "FashionMNIST", "Fashion-MNIST", mean=0.2860, std=0.3530, debian=True)
