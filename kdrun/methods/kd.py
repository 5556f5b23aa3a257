"""Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network" (RepDistiller distiller_zoo/KD.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdrun.methods.base import Method
from kdrun.methods.registry import register_method


def kd_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, T: float, reduction: str = "batchmean") -> torch.Tensor:
    """`T^2 * sum_i KL(softmax(t_i / T) || softmax(s_i / T)) / N` (batchmean, Hinton and RepDistiller), or with
    `reduction="mean"` divided by N x K, as `nn.KLDivLoss()` does by default (Tf-KD's and TAKD's code)."""
    log_p_s = F.log_softmax(s_logits.float() / T, dim=1)
    log_p_t = F.log_softmax(t_logits.float() / T, dim=1)
    total = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True) * (T * T)
    # Spelled out: torch's own reduction="mean" for kl_div is announced to become batchmean.
    return total / (s_logits.shape[0] if reduction == "batchmean" else s_logits.numel())


def symmetric_kl_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """SSLD's "JS divergence" as PaddleClas computes it (ppcls/loss/dmlloss.py, DMLLoss): with s, t the plain
    softmax outputs (no temperature), `mean_n sum_k (t log((t+eps)/(s+eps)) + s log((s+eps)/(t+eps))) / 2`,
    the symmetric KL; not the Jensen-Shannon divergence of the mixture (p + q) / 2, despite the name."""
    s = F.softmax(s_logits.float(), dim=1)
    t = F.softmax(t_logits.float(), dim=1)
    cost = t * torch.log((t + eps) / (s + eps)) + s * torch.log((s + eps) / (t + eps))
    return cost.sum(1).mean() / 2


@register_method("kd")
class KD(Method):
    """Hinton et al. 2015, Distilling the Knowledge in a Neural Network: (1 - alpha) CE + alpha T^2 KL."""

    ce_follows_alpha = True
    ls_terms = ("kd",)
    teacher_access = "probabilities"  # the teacher's softmax at T only: log p_T serves as its logits
    official_code = "RepDistiller distiller_zoo/KD.py (batchmean x T^2; kl_reduction=mean for nn.KLDivLoss() code)"
