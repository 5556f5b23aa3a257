"""The teacher's batch-norm statistics: forward hooks that record each BN layer's batch statistics (of its
input) during a forward, read without changing the teacher, and the two divergences built on them.

A hook reads `running_mean`/`running_var` and the layer's input; it never writes a buffer, and the teacher
stays in eval mode, where BN normalises with its running statistics and does not update them."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def bn_layers(model: nn.Module | None) -> list[_BatchNorm]:
    """The BN layers (1d/2d/3d) of `model` that hold running statistics to match."""
    if model is None:
        return []
    return [m for m in model.modules()
            if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None]


@dataclass
class LayerStats:
    """One BN layer's input statistics in one forward: per-channel batch mean and biased variance, with the
    layer's stored running mean and variance (detached copies of its buffers) and its eps."""

    mean: torch.Tensor
    var: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    eps: float


def batch_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance over every dimension but the channel one (N, H, W for images):
    DeepInversionFeatureHook's `input[0].mean([0, 2, 3])` and `.var(1, unbiased=False)` of the channel-major
    view (deepinversion_cifar10.py lines 59-62)."""
    dims = [0, *range(2, x.ndim)]
    return x.mean(dims), x.var(dims, unbiased=False)


class BNStatistics:
    """Forward hooks on every BN layer of `model`; `layers` holds the last forward's `LayerStats`, in the order
    the layers ran. Use as a context manager: the hooks are removed on exit."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.modules = bn_layers(model)
        self.layers: list[LayerStats] = []
        self._handles: list = []

    def __enter__(self) -> "BNStatistics":
        self._handles = [m.register_forward_hook(self._record) for m in self.modules]
        return self

    def __exit__(self, *exc) -> bool:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return False

    def clear(self) -> None:
        self.layers = []

    def _record(self, module: _BatchNorm, inputs, output) -> None:
        mean, var = batch_statistics(inputs[0])
        self.layers.append(LayerStats(mean, var, module.running_mean.detach().to(mean.dtype),
                                      module.running_var.detach().to(var.dtype), float(module.eps)))


def bn_kl_divergence(mu_hat: torch.Tensor, sigma_hat: torch.Tensor, mu_tilde: torch.Tensor,
                     sigma_tilde: torch.Tensor) -> torch.Tensor:
    """`KL(N(mu_hat, sigma_hat) || N(mu_tilde, sigma_tilde)) = log(sigma_tilde / sigma_hat)
    - 1/2 (1 - (sigma_hat^2 + (mu_hat - mu_tilde)^2) / sigma_tilde^2)`, summed over channels (Haroush et al.,
    BN-Statistics scheme): hat the batch's statistics, tilde the stored running ones."""
    return (torch.log(sigma_tilde / sigma_hat)
            - 0.5 * (1 - (sigma_hat ** 2 + (mu_hat - mu_tilde) ** 2) / sigma_tilde ** 2)).sum()


def bn_statistics_loss(layers: list[LayerStats]) -> torch.Tensor:
    """The BN-Statistics objective: `bn_kl_divergence` summed over every BN layer, with sigma = sqrt(var + eps)
    on both sides (the eps the layer itself normalises with keeps a constant channel finite)."""
    return sum(bn_kl_divergence(s.mean, torch.sqrt(s.var + s.eps), s.running_mean, torch.sqrt(s.running_var + s.eps))
               for s in layers)


def deepinversion_feature_loss(mean: torch.Tensor, var: torch.Tensor, running_mean: torch.Tensor,
                               running_var: torch.Tensor) -> torch.Tensor:
    """One layer's R_feature: `||running_var - var||_2 + ||running_mean - mean||_2` (deepinversion_cifar10.py
    lines 66-67; deepinversion.py lines 45-46)."""
    return torch.norm(running_var - var, 2) + torch.norm(running_mean - mean, 2)


def r_feature(layers: list[LayerStats]) -> torch.Tensor:
    """DeepInversion's R_feature: the layers' terms summed (deepinversion_cifar10.py line 181)."""
    return sum(deepinversion_feature_loss(s.mean, s.var, s.running_mean, s.running_var) for s in layers)
