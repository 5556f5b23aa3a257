"""Image priors, the jitter/flip of model inversion, the pixel range and the competition term: plain functions of
tensors shared by the syntheses. Formulas follow the official DeepInversion code (NVlabs/DeepInversion); the
line numbers below are those of `cifar10/deepinversion_cifar10.py` and `deepinversion.py` at its HEAD.

Every image here is in the normalised input space the teacher sees, `(pixel / 255 - mean) / std`."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def neighbour_differences(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Differences to the right, below and along both diagonals (deepinversion_cifar10.py lines 173-176,
    deepinversion.py lines 57-60)."""
    return (x[:, :, :, :-1] - x[:, :, :, 1:],
            x[:, :, :-1, :] - x[:, :, 1:, :],
            x[:, :, 1:, :-1] - x[:, :, :-1, 1:],
            x[:, :, :-1, :-1] - x[:, :, 1:, 1:])


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """DeepInversion's (l2) total variation: the sum of the Frobenius norms of the four neighbour differences
    over the whole batch (deepinversion_cifar10.py line 177; deepinversion.py line 62, `loss_var_l2`)."""
    return sum(d.norm() for d in neighbour_differences(x))


def total_variation_l1(x: torch.Tensor) -> torch.Tensor:
    """The l1 variant of the ImageNet code: the sum of the mean absolute neighbour differences
    (deepinversion.py lines 63-65, whose `/ 255` and `* 255` cancel)."""
    return sum(d.abs().mean() for d in neighbour_differences(x))


def l2_prior(x: torch.Tensor) -> torch.Tensor:
    """The l2 norm of the whole batch, as the CIFAR script takes it (deepinversion_cifar10.py line 186,
    `torch.norm(inputs_jit, 2)`; the ImageNet code averages per-image norms instead, deepinversion.py line 318)."""
    return x.norm()


def jitter_flip(x: torch.Tensor, dx: int, dy: int, flip: bool) -> torch.Tensor:
    """A circular shift by (dx, dy) pixels and an optional horizontal flip (deepinversion_cifar10.py lines
    137-139; flips: deepinversion.py lines 266-269)."""
    if dx or dy:
        x = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
    return torch.flip(x, dims=(3,)) if flip else x


def pixel_bounds(mean, std, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised values of pixels 0 and 255 per channel (1 x C x 1 x 1): the range utils/utils.py `clip`
    (lines 108-121) keeps an optimised image in."""
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return -m / s, (1 - m) / s


def clip_to_pixels(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    return torch.maximum(torch.minimum(x, high), low)


def to_uint8(x: torch.Tensor, mean, std) -> tuple[torch.Tensor, float]:
    """De-normalise to uint8 pixels (`round(255 (x std + mean))`, clamped to 0..255) and the fraction of
    values the clamp changed (values outside the range a real image can have)."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    pixels = ((x.float() * s + m) * 255.0).round()
    clipped = ((pixels < 0) | (pixels > 255)).float().mean().item() if pixels.numel() else 0.0
    return pixels.clamp(0, 255).to(torch.uint8), clipped


def competition_js(s_logits: torch.Tensor, t_logits: torch.Tensor, T: float = 3.0) -> torch.Tensor:
    """Adaptive DeepInversion's Jensen-Shannon divergence as the official code computes it
    (deepinversion_cifar10.py lines 157-166; deepinversion.py lines 301-309): P = softmax(s / T),
    Q = softmax(t / T), M = (P + Q) / 2, each clamped to [0.01, 0.99], then
    `0.5 KLDiv(log P, M) + 0.5 KLDiv(log Q, M)` with `batchmean`, i.e. `0.5 KL(M || P) + 0.5 KL(M || Q)` per
    image, averaged over the batch."""
    p = F.softmax(s_logits / T, dim=1)
    q = F.softmax(t_logits / T, dim=1)
    m = 0.5 * (p + q)
    p, q, m = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99), m.clamp(0.01, 0.99)
    kl = torch.nn.KLDivLoss(reduction="batchmean")
    return 0.5 * kl(torch.log(p), m) + 0.5 * kl(torch.log(q), m)


def competition_term(s_logits: torch.Tensor, t_logits: torch.Tensor, T: float = 3.0) -> torch.Tensor:
    """The loss term ADI adds: `1 - clamp(JS, 0, 1)` (deepinversion_cifar10.py line 168), i.e. `-JS` up to a
    constant, so minimising it makes the images where student and teacher disagree."""
    return 1.0 - torch.clamp(competition_js(s_logits, t_logits, T), 0.0, 1.0)
