"""Batched augmentation on the training device: random crop with zero padding, horizontal flip, normalise.

Each random step is a draw (`crop_offsets`, `flip_draws`) and its application (`crop_at`, `flip_where`), so a
loader can keep what it drew: the teacher-output cache (kdrun/speed/) indexes a batch's views by those draws.
`random_crop` and `random_hflip` are the two together, drawing from the generator exactly as they always did."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def crop_offsets(n: int, padding: int, device, generator: torch.Generator) -> torch.Tensor:
    """2 x n crop offsets in [0, 2 * padding]: row 0 the top edge (dy), row 1 the left edge (dx) of each crop."""
    return torch.randint(0, 2 * padding + 1, (2, n), device=device, generator=generator)


def crop_at(images: torch.Tensor, offsets: torch.Tensor, padding: int) -> torch.Tensor:
    """Pad each image by `padding` zeros and crop it back at its offset (`crop_offsets`)."""
    n, _, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    rows = offsets[0, :, None] + torch.arange(h, device=images.device)  # n x h
    cols = offsets[1, :, None] + torch.arange(w, device=images.device)  # n x w
    batch = torch.arange(n, device=images.device)[:, None, None]
    # Advanced indexing gathers n x h x w x C; move channels back to dim 1 in contiguous NCHW memory, since
    # channels-last strides would silently send every conv and batch norm down a slow path on the CPU.
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Pad each image by `padding` zeros and crop it back at a random offset (one offset per image)."""
    if padding <= 0:
        return images
    return crop_at(images, crop_offsets(images.shape[0], padding, images.device, generator), padding)


def flip_draws(n: int, device, generator: torch.Generator) -> torch.Tensor:
    """n booleans: which images are flipped (each with probability 1/2)."""
    return torch.rand(n, device=device, generator=generator) < 0.5


def flip_where(images: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    return torch.where(flips[:, None, None, None], images.flip(3), images)


def random_hflip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return flip_where(images, flip_draws(images.shape[0], images.device, generator))


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [0, 1] -> (x - mean) / std, per channel."""
    return (images.float().div_(255.0) - mean) / std
