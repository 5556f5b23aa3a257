"""CIFAR-10 and CIFAR-100 through torchvision's own classes (the pickled python batches under `root`)."""
from __future__ import annotations

import numpy as np
import torch

from kdrun.data.registry import ImageData, dataset_root, register_dataset, torchvision_splits
from kdrun.errors import ConfigError

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def _load_cifar(cfg, cls_name: str, title: str, expected_files: str, mean, std) -> ImageData:
    import torchvision.datasets as tvd

    cls = getattr(tvd, cls_name)
    value, root = dataset_root(cfg, f"{title} needs a directory to read (or download) it from")
    download = bool(cfg.get("download", False))
    folder = root / cls.base_folder
    names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    expected = f"expected {folder}/{expected_files}"
    if not download and not all((folder / name).is_file() for name in names):
        raise ConfigError(f"dataset.root={value} has no {title} files ({expected}); "
                          f"put them there or set dataset.download=true")
    train, test = torchvision_splits(cls, root, value, title, expected, download)

    def images(ds) -> torch.Tensor:  # torchvision keeps N x 32 x 32 x 3 (HWC); the loader wants N x 3 x 32 x 32
        return torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))).to(torch.uint8)

    def labels(ds) -> torch.Tensor:
        return torch.as_tensor(ds.targets, dtype=torch.long)

    num_classes = len(train.classes)
    for split, ds in (("train", train), ("test", test)):
        y = labels(ds)
        if len(y) == 0 or len(y) != len(ds.data) or int(y.min()) < 0 or int(y.max()) >= num_classes:
            raise ConfigError(f"dataset.root={value} has corrupt {title} {split} files ({expected}: "
                              f"{len(ds.data)} images, {len(y)} labels, {num_classes} class names)")
    return ImageData(images(train), labels(train), images(test), labels(test), num_classes=num_classes,
                     mean=mean, std=std, crop_padding=4, hflip=True)


@register_dataset("cifar10", "CIFAR-10, 32x32 colour, 10 classes (torchvision layout; download=true fetches it)",
                  shape=(3, 32, 32), classes=10)
def load_cifar10(cfg) -> ImageData:
    return _load_cifar(cfg, "CIFAR10", "CIFAR-10", "data_batch_1..5, test_batch, batches.meta",
                       CIFAR10_MEAN, CIFAR10_STD)


@register_dataset("cifar100", "CIFAR-100, 32x32 colour, 100 fine classes "
                             "(torchvision layout; download=true fetches it)", shape=(3, 32, 32), classes=100)
def load_cifar100(cfg) -> ImageData:
    return _load_cifar(cfg, "CIFAR100", "CIFAR-100", "train, test, meta", CIFAR100_MEAN, CIFAR100_STD)
