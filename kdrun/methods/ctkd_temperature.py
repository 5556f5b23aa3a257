"""CTKD's learnable temperature (Li et al. 2023, "Curriculum Temperature for Knowledge Distillation"; official
zhengli97/CTKD models/temp_global.py, train_student.py::CosineDecay/LinearDecay, helper/loops.py).

The temperature module predicts a raw value, a gradient-reversal layer multiplies its gradient by the
curriculum's factor (0 down to -1: the module then ascends the KD loss the student descends), and the raw
value is mapped into `(t_start, t_start + t_end)` by `t_start + t_end * sigmoid(raw)`, as helper/loops.py does
after calling the module. The student's own gradient never passes through the reversal.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class GradientReversalFunction(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by `factor` (temp_global.py: `lambda_ *
    grads`; the sign comes from the curriculum, whose values are <= 0 by default)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def reverse_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    return GradientReversalFunction.apply(x, factor)


def cosine_decay(epoch: float, max_value: float, min_value: float, loops: float) -> float:
    """train_student.py::CosineDecay.get_value: half a cosine from `max_value` at epoch 0 to `min_value` at
    epoch `loops`, constant after; the official run sets it from epoch 1 on (0 -> -1 over 10 epochs)."""
    i = min(max(epoch, 0), loops)
    return (math.cos(i * math.pi / loops) + 1.0) * 0.5 * (max_value - min_value) + min_value


def linear_decay(epoch: float, max_value: float, min_value: float, loops: float) -> float:
    """train_student.py::LinearDecay.get_value (`--cosine_decay 0`), as written there: `-i (max - min) / loops`
    with i clamped to [0, loops - 1]; it starts from 0 whatever `max_value` is and stops one step short of
    `-(max - min)`."""
    i = min(max(epoch, 0), loops - 1)
    return i * -((max_value - min_value) / loops)


class TemperatureModule(nn.Module):
    """`t_start + t_end * sigmoid(reverse_gradient(raw, factor))`; subclasses say what `raw` is."""

    def __init__(self, t_start: float, t_end: float):
        super().__init__()
        self.t_start, self.t_end = t_start, t_end

    def raw(self, t_logits: torch.Tensor, s_logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, t_logits: torch.Tensor, s_logits: torch.Tensor, factor: float) -> torch.Tensor:
        return self.t_start + self.t_end * torch.sigmoid(reverse_gradient(self.raw(t_logits, s_logits), factor))


class GlobalTemperature(TemperatureModule):
    """temp_global.py::Global_T: one learnable scalar for every sample, initialised to 1 (so the first
    temperature is t_start + t_end * sigmoid(1), 15.62 with the official 1 and 20); shape [1]."""

    def __init__(self, t_start: float, t_end: float):
        super().__init__(t_start, t_end)
        self.global_T = nn.Parameter(torch.ones(1))  # the official parameter's name

    def raw(self, t_logits, s_logits):
        return self.global_T


class InstanceTemperature(TemperatureModule):
    """Instance-wise temperature: a two-layer MLP (the authors' "two 1x1 convs", which on a [B, 2C] vector are
    linear layers) on the concatenated teacher and student probabilities [p_t, p_s] (the paper's Fig. 2),
    one temperature per sample; shape [B].

    The repository ships only Global_T (its README links the instance module's code on a drive, outside the
    repository), so the hidden width is a key (`instance_hidden`), the activation a ReLU, and the inputs are
    detached: the reversed gradient trains the module alone, the student learns from the KD term only."""

    def __init__(self, num_classes: int, hidden: int, t_start: float, t_end: float):
        super().__init__(t_start, t_end)
        self.mlp = nn.Sequential(nn.Linear(2 * num_classes, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))

    def raw(self, t_logits, s_logits):
        probs = torch.cat([F.softmax(t_logits.detach().float(), dim=1), F.softmax(s_logits.detach().float(), dim=1)],
                          dim=1)
        return self.mlp(probs).squeeze(1)
