"""Throughput of the ImageNet loader path: JPEG decoding, RandomResizedCrop 224 + flip (torchvision transforms v2
in DataLoader workers), pinned memory and the copy to the device, normalisation there, channels_last.

    python scripts/bench_folder_loader.py --workers 0 2 4 --images 512            # generated JPEGs, CPU
    python scripts/bench_folder_loader.py --root ~/imagenet --device cuda --workers 8 16

Without --root it writes ImageNet-sized JPEGs (500 x 375, 10 classes) to a temporary folder. It prints the median
images/s over --rounds passes (after one warm-up pass) per worker count, measured in one run, interleaved."""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kdrun.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD, FolderLoader


def write_jpegs(root: Path, images: int, classes: int = 10) -> None:
    rng = np.random.default_rng(0)
    for k in range(images):
        folder = root / "train" / f"n{k % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        # smooth noise compresses like a photograph more than white noise does
        small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        Image.fromarray(small).resize((500, 375), Image.BILINEAR).save(folder / f"{k}.JPEG", quality=90)


def one_pass(loader: FolderLoader, channels_last: bool) -> float:
    start = time.perf_counter()
    for images, _, _ in loader:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
    if loader.device.type == "cuda":
        torch.cuda.synchronize()
    return loader.num_samples / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, help="an ImageFolder root with train/ (default: generated JPEGs)")
    parser.add_argument("--images", type=int, default=512, help="generated images (without --root)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from torchvision.datasets import ImageFolder

    with tempfile.TemporaryDirectory() as scratch:
        root = args.root
        if root is None:
            root = Path(scratch)
            write_jpegs(root, args.images)
        dataset = ImageFolder(str(Path(root).expanduser() / "train"))
        loaders = {w: FolderLoader(dataset, args.batch_size, IMAGENET_MEAN, IMAGENET_STD, args.device, train=True,
                                   image_size=224, crop="resized", workers=w) for w in args.workers}
        for loader in loaders.values():
            one_pass(loader, True)  # warm-up: worker start, file cache
        speeds = {w: [] for w in args.workers}
        for _ in range(args.rounds):
            for w, loader in loaders.items():
                speeds[w].append(one_pass(loader, True))
    print(f"{len(dataset)} images, batch {args.batch_size}, device {args.device}, {args.rounds} rounds")
    print("| workers | images/s (median) |\n| ---: | ---: |")
    for w, values in speeds.items():
        print(f"| {w} | {statistics.median(values):.0f} |")


if __name__ == "__main__":
    main()
