"""Batch loaders. `TensorLoader` serves an in-memory dataset held on the training device; every batch is
`(images, labels, indices)` with the indices into the dataset (contrastive memory banks need them)."""
from __future__ import annotations

import math

import torch

from kdrun.data.augment import normalize, random_crop, random_hflip
from kdrun.data.imagefolder import FolderData, FolderLoader, augmentation_label, make_folder_loaders
from kdrun.data.registry import ImageData


class TensorLoader:
    """Shuffled (train) or ordered (test) batches of a uint8 tensor dataset (or of float32 feature vectors,
    N x D x 1 x 1, taken as they are), augmented on its device.

    Reproducible: the shuffling and augmentation draw from one generator seeded by `seed`.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, mean, std,
                 device: torch.device | str = "cpu", train: bool = True, crop_padding: int = 0,
                 hflip: bool = False, seed: int = 0, drop_last: bool = False):
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size = batch_size
        self.train = train
        self.crop_padding = crop_padding if train else 0
        self.hflip = hflip and train
        self.drop_last = drop_last
        channels = images.shape[1]
        self.mean = torch.tensor(mean, device=self.device).view(1, channels, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, channels, 1, 1)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    @property
    def augmentation(self) -> str:
        return augmentation_label(False, self.crop_padding, self.hflip)

    def __len__(self) -> int:
        n = self.num_samples / self.batch_size
        return math.floor(n) if self.drop_last else math.ceil(n)

    def __iter__(self):
        n = self.num_samples
        if self.train:
            order = torch.randperm(n, device=self.device, generator=self.generator)
        else:
            order = torch.arange(n, device=self.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start:start + self.batch_size]
            images = self.images[index]
            if self.crop_padding:
                images = random_crop(images, self.crop_padding, self.generator)
            if self.hflip:
                images = random_hflip(images, self.generator)
            if images.is_floating_point():  # float features (N x D x 1 x 1): no [0, 255] scale to undo
                yield (images - self.mean) / self.std, self.labels[index], index
            else:
                yield normalize(images, self.mean, self.std), self.labels[index], index


def make_loaders(data: ImageData | FolderData, batch_size: int, device, seed: int,
                 eval_batch_size: int = 512) -> tuple[TensorLoader | FolderLoader, TensorLoader | FolderLoader]:
    """Training loader (shuffled, augmented) and test loader (ordered, plain) for a dataset record.

    An in-memory `ImageData` gets TensorLoaders; an image folder (`FolderData`) gets DataLoader-backed
    FolderLoaders. Both yield `(images, labels, indices)` on `device` and have `len()` and `num_samples`.
    """
    if isinstance(data, FolderData):
        return make_folder_loaders(data, batch_size, device, seed, eval_batch_size)
    train = TensorLoader(data.train_images, data.train_labels, batch_size, data.mean, data.std, device,
                         train=True, crop_padding=data.crop_padding, hflip=data.hflip, seed=seed)
    test = TensorLoader(data.test_images, data.test_labels, eval_batch_size, data.mean, data.std, device,
                        train=False)
    return train, test
