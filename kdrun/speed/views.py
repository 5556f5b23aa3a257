"""The views of an image under the in-memory augmentation (kdrun/data/augment.py): a crop at offset (dy, dx)
of the image padded by `padding` zeros, then a horizontal flip or not. An image has
`(2 * padding + 1) ** 2 * (2 if hflip else 1)` views (9 for digits at pad 1, 25 for Fashion-MNIST at pad 2,
162 for CIFAR at pad 4 with flips), numbered `(dy * (2 * padding + 1) + dx) * flips + flip`."""
from __future__ import annotations

import torch

from kdrun.data.augment import crop_at, flip_where


def view_count(padding: int, hflip: bool) -> int:
    return (2 * padding + 1) ** 2 * (2 if hflip else 1)


def view_ids(offsets: torch.Tensor | None, flips: torch.Tensor | None, padding: int, hflip: bool, n: int,
             device=None) -> torch.Tensor:
    """The view id of each of n images from the loader's draws: `offsets` 2 x n (dy, dx; None without crop),
    `flips` n booleans (None without flip)."""
    side = 2 * padding + 1
    ids = torch.zeros(n, dtype=torch.long, device=device) if offsets is None else offsets[0] * side + offsets[1]
    if hflip:
        ids = ids * 2 + flips.long()
    return ids


def view_params(ids: torch.Tensor, padding: int, hflip: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dy, dx, flip) of each view id: the inverse of `view_ids`."""
    side = 2 * padding + 1
    flip = ids % 2 if hflip else torch.zeros_like(ids)
    position = ids // 2 if hflip else ids
    return position // side, position % side, flip.bool()


def apply_views(images: torch.Tensor, ids: torch.Tensor, padding: int, hflip: bool) -> torch.Tensor:
    """Each image at its view: the loader's own crop and flip (kdrun/data/augment.py) at the view's offset and
    flip, so the pixels and the memory layout are the loader's (a 1-channel crop keeps strides that send the
    convolutions down another, not bit-identical, path than plain NCHW would)."""
    dy, dx, flip = view_params(ids, padding, hflip)
    if padding:
        images = crop_at(images, torch.stack([dy, dx]), padding)
    if hflip:
        images = flip_where(images, flip)
    return images


def all_views(images: torch.Tensor, padding: int, hflip: bool) -> torch.Tensor:
    """(n * V) x C x H x W: every view of every image, image by image and each in view-id order."""
    views = view_count(padding, hflip)
    ids = torch.arange(views, device=images.device).repeat(images.shape[0])
    return apply_views(images.repeat_interleave(views, dim=0), ids, padding, hflip)
