"""A bias-free linear binary classifier, the teacher and student of Phuong & Lampert (ICML 2019)."""
from __future__ import annotations

import torch
from torch import nn

from kdrun.errors import ConfigError
from kdrun.models.registry import register_model


class LogitDifference(nn.Module):
    """`[-w^T x / 2, w^T x / 2]`: two logits whose difference is `w^T x`, so that softmax gives
    `p(class 1) = sigmoid(w^T x)`, the paper's linear classifier."""

    def __init__(self, in_features: int):
        super().__init__()
        self.in_features = in_features
        self.weight = nn.Parameter(torch.empty(in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = 0.5 * (x @ self.weight)
        return torch.stack([-half, half], dim=1)


class Linear(nn.Module):
    def __init__(self, in_features: int, zero_init: bool):
        super().__init__()
        self.flatten = nn.Flatten()
        self.head = LogitDifference(in_features)
        if zero_init:
            # The paper's student starts at 0: every gradient of the distillation loss is a combination of
            # training inputs, so gradient descent never leaves their span.
            nn.init.zeros_(self.head.weight)
        else:
            nn.init.normal_(self.head.weight, std=in_features ** -0.5)
        self.feature_aliases = {"pool": "flatten", "logits": "head"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(x))


@register_model("linear")
def linear(num_classes: int, in_channels: int, zero_init: bool = True) -> Linear:
    """Bias-free linear binary classifier on the flattened input, logit difference w^T x (Phuong & Lampert 2019)"""
    if num_classes != 2:
        raise ConfigError(f"model linear is a binary classifier (2 classes); this dataset has {num_classes} "
                          "(use dataset=linear_teacher)")
    # The dataset's channels are its features when images are 1 x 1 (linear_teacher): N x D x 1 x 1.
    return Linear(in_channels, zero_init)
