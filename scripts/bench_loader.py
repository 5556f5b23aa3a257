"""Loader throughput: kdrun's in-memory loader (uint8 tensors on the training device, crop/flip/normalise in
batches) against the field's usual pipeline (torchvision transforms on PIL images in DataLoader workers, as in
RepDistiller), on CIFAR-shaped data, in one run. Prints images/s of each and their ratio.

    python scripts/bench_loader.py [--images 20000] [--batch 64] [--workers 2] [--device auto]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from kdrun.data import TensorLoader

MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


class PilDataset(Dataset):
    """CIFAR's torchvision dataset in miniature: HWC uint8 arrays turned into PIL images per sample."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def images_per_second(loader, device: torch.device, n: int) -> float:
    started = time.perf_counter()
    for batch in loader:
        images = batch[0].to(device, non_blocking=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    opts = parser.parse_args()
    device = torch.device("cuda" if opts.device == "auto" and torch.cuda.is_available()
                          else "cpu" if opts.device == "auto" else opts.device)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (opts.images, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 100, opts.images)

    ours = TensorLoader(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels),
                        opts.batch, MEAN, STD, device, train=True, crop_padding=4, hflip=True, seed=0)
    pipeline = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    theirs = DataLoader(PilDataset(images, labels, pipeline), batch_size=opts.batch, shuffle=True,
                        num_workers=opts.workers, pin_memory=device.type == "cuda")

    images_per_second(ours, device, opts.images)  # warm-up: first-touch allocations
    ours_rate = images_per_second(ours, device, opts.images)
    theirs_rate = images_per_second(theirs, device, opts.images)
    print(f"device {device}, {opts.images} CIFAR-shaped images, batch {opts.batch}")
    print(f"kdrun in-memory loader:              {ours_rate:10.0f} images/s")
    print(f"torchvision PIL + DataLoader ({opts.workers} workers): {theirs_rate:10.0f} images/s")
    print(f"ratio: {ours_rate / theirs_rate:.1f}x")


if __name__ == "__main__":
    main()
