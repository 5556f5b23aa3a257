"""Batch loaders. `TensorLoader` serves an in-memory dataset held on the training device; every batch is
`(images, labels, indices)` with the indices into the dataset (contrastive memory banks need them)."""
from __future__ import annotations

import math
from collections import deque

import torch

from kdrun.data.augment import crop_at, crop_offsets, flip_draws, flip_where, normalize
from kdrun.data.imagefolder import FolderData, FolderLoader, augmentation_label, make_folder_loaders
from kdrun.data.registry import ImageData
from kdrun.speed.views import view_count, view_ids

RECENT_BATCHES = 4  # batches whose draws a loader keeps: a step may look its batch's views up after a prefetch


class TensorLoader:
    """Shuffled (train) or ordered (test) batches of a uint8 tensor dataset (or of float32 feature vectors,
    N x D x 1 x 1, taken as they are), augmented on its device.

    Reproducible: the shuffling and augmentation draw from one generator seeded by `seed`. A training loader
    keeps the draws of its last few batches, so `views_of(index)` gives each image's view id (kdrun/speed/views.py)
    for the batch whose indices are `index`: the teacher-output cache looks its logits up by them.
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
        self._draws: deque = deque(maxlen=RECENT_BATCHES)  # (index, crop offsets, flips) per recent batch

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    @property
    def augmentation(self) -> str:
        return augmentation_label(False, self.crop_padding, self.hflip)

    @property
    def view_count(self) -> int:
        """How many distinct views of an image the augmentation can give (1: none)."""
        return view_count(self.crop_padding, self.hflip)

    def views_of(self, index: torch.Tensor) -> torch.Tensor:
        """The view id of each image of the batch this loader yielded with `index` (that very tensor)."""
        for batch, offsets, flips in reversed(self._draws):
            if batch is index:
                return view_ids(offsets, flips, self.crop_padding, self.hflip, len(index), self.device)
        raise RuntimeError("the teacher-output cache looks up a batch's views by the index tensor its loader "
                           "yielded; this batch's index is not one of the loader's last batches (was it copied "
                           "or made by another loader?)")

    def normalized(self, images: torch.Tensor) -> torch.Tensor:
        """The model's input for these (augmented) images: uint8 -> (x / 255 - mean) / std; float features
        (N x D x 1 x 1) have no [0, 255] scale to undo."""
        if images.is_floating_point():
            return (images - self.mean) / self.std
        return normalize(images, self.mean, self.std)

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
            offsets = flips = None
            if self.crop_padding:
                offsets = crop_offsets(len(index), self.crop_padding, self.device, self.generator)
                images = crop_at(images, offsets, self.crop_padding)
            if self.hflip:
                flips = flip_draws(len(index), self.device, self.generator)
                images = flip_where(images, flips)
            if self.train:
                self._draws.append((index, offsets, flips))
            yield self.normalized(images), self.labels[index], index


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
