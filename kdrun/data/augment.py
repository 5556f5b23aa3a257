"""Batched augmentation on the training device: random crop with zero padding, horizontal flip, normalise."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Pad each image by `padding` zeros and crop it back at a random offset (one offset per image)."""
    if padding <= 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    offsets = torch.randint(0, 2 * padding + 1, (2, n), device=images.device, generator=generator)
    rows = offsets[0, :, None] + torch.arange(h, device=images.device)  # n x h
    cols = offsets[1, :, None] + torch.arange(w, device=images.device)  # n x w
    batch = torch.arange(n, device=images.device)[:, None, None]
    # Advanced indexing gathers n x h x w x C; move channels back to dim 1 in contiguous NCHW memory, since
    # channels-last strides would silently send every conv and batch norm down a slow path on the CPU.
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def random_hflip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(images.shape[0], device=images.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [0, 1] -> (x - mean) / std, per channel."""
    return (images.float().div_(255.0) - mean) / std
