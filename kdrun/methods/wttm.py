"""Zheng & Yang 2024, "Knowledge Distillation Based on Transformed Teacher Matching", weighted TTM (ICLR;
official code zkxufo/TTM, distiller_zoo/wttm.py)."""
from __future__ import annotations

import torch

from kdrun.methods.base import Forward
from kdrun.methods.registry import register_method
from kdrun.methods.ttm import TTM, ttm_divergences


def wttm_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, gamma: float = 0.2) -> torch.Tensor:
    """WTTM: `mean_n U_n * KL(p_t^gamma / U_n || softmax(z_s))`, `U_n = sum_k p_t(k)^gamma` (official WTTM.forward).

    The weight is the power sum itself: neither normalised over the batch nor clipped, between 1 (a one-hot
    teacher) and K^(1 - gamma) (a uniform one) for gamma < 1, so smoother teachers count more; it is a constant
    of the teacher (no gradient), as under the official torch.no_grad()."""
    kl, weight = ttm_divergences(s_logits, t_logits, gamma)
    return (weight * kl).mean()


@register_method("wttm")
class WTTM(TTM):
    """Zheng & Yang 2024, Knowledge Distillation Based on Transformed Teacher Matching, weighted (zkxufo/TTM wttm.py).

    `ce_weight * CE + beta * WTTM`: TTM's per-sample divergence weighted by the power sum of the transformed
    teacher's probabilities; keys and the refusal of logit standardization as `ttm`."""

    official_code = "zkxufo/TTM distiller_zoo/wttm.py (weight and p_t^gamma computed in log space, as ttm)"
    term_names = ("wttm",)
    default_gamma = 0.2  # the README's WTTM command (WTTM + CRD, vgg13 -> vgg8)

    def method_terms(self, fw: Forward) -> dict[str, torch.Tensor]:
        return {"wttm": wttm_loss(fw.s_logits, fw.t_logits, self.gamma)}
