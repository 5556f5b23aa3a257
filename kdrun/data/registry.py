"""The dataset registry and the in-memory dataset record every loader builds on."""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from kdrun.errors import ConfigError
from kdrun.registry import Registry

DATASETS: Registry = Registry("dataset")
# (C, H, W) and number of classes of each dataset, known without loading it (`kdrun ls layers` uses them).
INPUT_SHAPES: dict[str, tuple[tuple[int, int, int], int]] = {}


def register_dataset(name: str, description: str | None = None, shape: tuple[int, int, int] | None = None,
                     classes: int | None = None):
    """Register `load(cfg) -> ImageData | FolderData` under `name`; `cfg` is the `dataset` config node.

    A loader checks its files first and raises ConfigError naming `dataset.root` when they are missing.
    `shape` and `classes` describe its images when they are fixed (an image folder's are the user's).
    """
    if shape is not None:
        INPUT_SHAPES[name] = (tuple(shape), classes)
    return DATASETS.register(name, description)


@dataclass
class ImageData:
    """A whole dataset as uint8 image tensors (N, C, H, W) with int64 labels, plus how to augment it.

    Real-valued feature vectors (synthetic sets such as `linear_teacher`) come as float32 N x D x 1 x 1:
    normalised with `mean`/`std` as they are (no division by 255), never cropped or flipped.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int  # random-crop padding in pixels for training (0: no crop)
    hflip: bool        # random horizontal flips for training (never for digits)

    @property
    def in_channels(self) -> int:
        return self.train_images.shape[1]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])

    def __post_init__(self):
        for split, images, labels in (("train", self.train_images, self.train_labels),
                                      ("test", self.test_images, self.test_labels)):
            if images.dtype == torch.float32:
                if images.ndim != 4 or tuple(images.shape[2:]) != (1, 1) or self.crop_padding or self.hflip:
                    raise ValueError(f"{split} features must be float32 N x D x 1 x 1 without crop or flip, got "
                                     f"{tuple(images.shape)}, crop_padding={self.crop_padding}, hflip={self.hflip}")
            elif images.dtype != torch.uint8 or images.ndim != 4:
                raise ValueError(f"{split} images must be uint8 N x C x H x W, got {images.dtype} {tuple(images.shape)}")
            if len(images) != len(labels):
                raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels")
        if self.train_images.dtype != self.test_images.dtype:
            raise ValueError(f"train images are {self.train_images.dtype}, test images {self.test_images.dtype}")


def dataset_root(cfg, needs: str) -> tuple[str, Path]:
    """`dataset.root` as the user wrote it and expanded; an unset root is refused, saying what it `needs`."""
    value = cfg.get("root")
    if value is None or str(value).strip() == "":
        raise ConfigError(f"dataset.root is not set; {needs}")
    return str(value), Path(os.path.expanduser(str(value)))


def one_line(err: BaseException, limit: int = 300) -> str:
    """A library's error message on one line (torchvision's download errors span several), shortened."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


# What torchvision raises on a missing, truncated or corrupt file (md5, pickle, IDX) and on a failed download.
READ_ERRORS = (RuntimeError, OSError, ValueError, KeyError, EOFError, TypeError, AssertionError,
               pickle.UnpicklingError)


def torchvision_splits(cls, root: Path, value: str, title: str, expected: str, download: bool):
    """The train and test datasets of a torchvision class; its errors become one ConfigError line."""
    try:
        return cls(str(root), train=True, download=download), cls(str(root), train=False)
    except READ_ERRORS as err:
        action = "could not download or read" if download else "has missing or corrupt"
        raise ConfigError(f"dataset.root={value} {action} {title} files ({expected}; torchvision: "
                          f"{one_line(err)})") from None
