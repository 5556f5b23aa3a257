"""Sun et al. 2024, "Logit Standardization in Knowledge Distillation" (CVPR; official code
sunshangquan/logit-standardization-KD, mdistiller/distillers/KD.py::normalize and tools/train.py).

Not a method but a modifier of every logit-based one (`method.logit_standardize=true`): the logits a
distillation term compares are z-scored per sample before the temperature, so the student matches the
teacher's logit *relations* rather than their range. With it on, as the official `--logit-stand` flag does,
the temperature becomes `base_T` (its `--base-temp`, 2) and the weight of the method's distillation term
`ls_weight` (its `--kd-weight`, 9; DKD's official code multiplies DKD's alpha and beta by it, which with
kdrun's DKD weight `beta` 1 is the same). Cross-entropy keeps the raw logits and its weight.
"""
from __future__ import annotations

import torch

STD_EPS = 1e-7  # the official `(logit - mean) / (1e-7 + stdv)`


def standardize_logits(logits: torch.Tensor) -> torch.Tensor:
    """`(z - mean(z)) / (1e-7 + std(z))` over the classes of each sample, std unbiased (torch's default, as the
    official `logit.std(dim=-1)`), in float32: under bf16 autocast the mean and std would keep 3 digits.

    On a black box's log-probabilities (teacher.access=probabilities) the result equals that of the logits, log p
    being the logits shifted per sample, except where log p is clamped at log(tiny) (logit gaps above ~87)."""
    logits = logits.float()
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True)
    return (logits - mean) / (STD_EPS + std)
