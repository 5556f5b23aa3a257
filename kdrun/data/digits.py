"""UCI optical digits from scikit-learn: the embedded default dataset (no download, no files)."""
from __future__ import annotations

import torch

from kdrun.data.registry import ImageData, register_dataset

TEST_FRACTION = 0.2
SPLIT_SEED = 0  # the split is part of the dataset, not of the experiment: fixed across seeds


@register_dataset("digits", "UCI optical digits, 8x8 grey, 10 classes (scikit-learn's bundled set; offline)",
                  shape=(1, 8, 8), classes=10)
def load_digits(cfg) -> ImageData:
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    # Pixel values are 0..16; scale to 0..255 so every dataset enters the loader as uint8 images.
    images = torch.from_numpy((bunch.images * (255.0 / 16.0)).round()).to(torch.uint8).unsqueeze(1)
    labels = torch.from_numpy(bunch.target).long()
    train_idx, test_idx = train_test_split(torch.arange(len(labels)).numpy(), test_size=TEST_FRACTION,
                                           random_state=SPLIT_SEED, stratify=labels.numpy())
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    train_images = images[train_idx]
    mean = (train_images.float().mean().item() / 255.0,)
    std = (train_images.float().std().item() / 255.0,)
    return ImageData(train_images, labels[train_idx], images[test_idx], labels[test_idx], num_classes=10,
                     mean=mean, std=std, crop_padding=1, hflip=False)
