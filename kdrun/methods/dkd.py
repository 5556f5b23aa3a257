"""Zhao et al. 2022, "Decoupled Knowledge Distillation" (mdistiller mdistiller/distillers/DKD.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdrun.methods.base import Forward, Method
from kdrun.methods.common import config_number
from kdrun.methods.registry import register_method

MASKED = 1000.0  # subtracted from the (tempered) target logit to drop it from the non-target softmax


def dkd_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, target: torch.Tensor, alpha: float, beta: float,
             T: float) -> torch.Tensor:
    """`alpha * TCKD + beta * NCKD`, each a KL(teacher || student) summed over the batch, divided by N, times T^2.

    TCKD compares the binary distributions [p_target, 1 - p_target]; NCKD the softmax over the non-target
    classes, obtained as in mdistiller by subtracting 1000 from the target's logit / T. The binary log
    probabilities come from logsumexp instead of log(sum of softmax), which is the same value without the
    underflow to log(0)."""
    s, t = s_logits.float() / T, t_logits.float() / T
    gt_mask = F.one_hot(target, s.shape[1]).bool()
    tckd = F.kl_div(binary_log_probs(s, gt_mask), binary_log_probs(t, gt_mask), reduction="sum", log_target=True)
    nckd = F.kl_div(F.log_softmax(s - MASKED * gt_mask, dim=1), F.log_softmax(t - MASKED * gt_mask, dim=1),
                    reduction="sum", log_target=True)
    n = target.shape[0]
    return (alpha * tckd + beta * nckd) * (T * T) / n


def binary_log_probs(scaled_logits: torch.Tensor, gt_mask: torch.Tensor) -> torch.Tensor:
    """N x 2: log p(target) and log p(not target) under softmax(scaled_logits)."""
    log_total = torch.logsumexp(scaled_logits, dim=1)
    log_target = scaled_logits.masked_fill(~gt_mask, float("-inf")).logsumexp(dim=1)
    log_others = scaled_logits.masked_fill(gt_mask, float("-inf")).logsumexp(dim=1)
    return torch.stack([log_target, log_others], dim=1) - log_total[:, None]


@register_method("dkd")
class DKD(Method):
    """Zhao et al. 2022, Decoupled Knowledge Distillation: TCKD + NCKD with a linear warm-up (mdistiller DKD.py).

    The DKD weight is `beta * min(epoch / warmup, 1)` with epochs counted from 1, as mdistiller does; CE keeps
    `ce_weight` (1). `dkd_alpha`/`dkd_beta` weigh TCKD/NCKD inside the term; the runner's `alpha` stays the
    weight of an optional Hinton KD term (0 by default)."""

    official_code = "mdistiller mdistiller/distillers/DKD.py (linear warm-up over `warmup` epochs as its configs)"
    uses_labels = True  # a transfer set without labels refuses it
    teacher_access = "probabilities"  # softmax of the teacher only: log p_T serves as its logits

    term_names = ("dkd",)
    ls_terms = ("dkd",)

    def __init__(self, cfg, student, teacher, num_classes):
        super().__init__(cfg, student, teacher, num_classes)
        self.dkd_alpha = config_number(cfg, "dkd_alpha", 1.0)
        self.dkd_beta = config_number(cfg, "dkd_beta", 8.0)
        self.warmup = config_number(cfg, "warmup", 20.0)
        self.warmup_factor = 0.0

    def uses_teacher_outputs(self) -> bool:
        return self.distilling()  # the DKD term needs the teacher's logits even with alpha 0

    def begin_epoch(self, epoch: int) -> None:
        super().begin_epoch(epoch)
        self.warmup_factor = min(epoch / self.warmup, 1.0) if self.warmup > 0 else 1.0

    def weights(self) -> dict[str, float]:
        weights = super().weights()
        weights["dkd"] *= self.warmup_factor
        return weights

    def method_terms(self, fw: Forward) -> dict[str, torch.Tensor]:
        return {"dkd": dkd_loss(self.distil_logits(fw.s_logits), self.distil_logits(fw.t_logits), fw.labels,
                                self.dkd_alpha, self.dkd_beta, self.T)}
