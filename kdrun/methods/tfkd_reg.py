"""Yuan, Tay, Li, Wang & Feng CVPR 2020, "Revisiting Knowledge Distillation via Label Smoothing Regularization":
Tf-KD regularisation, KD from a hand-made virtual teacher instead of a trained one (the authors' code,
yuanli2333/Teacher-free-Knowledge-Distillation my_loss_function.py::loss_kd_regularization)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdrun.errors import ConfigError
from kdrun.methods.base import KL_REDUCTIONS, Forward, Method
from kdrun.methods.common import config_number
from kdrun.methods.registry import register_method


def virtual_teacher(target: torch.Tensor, num_classes: int, a: float) -> torch.Tensor:
    """The virtual teacher's distribution (N x K): `a` on the true class, `(1 - a) / (K - 1)` on each other."""
    if num_classes < 2:
        raise ValueError(f"a virtual teacher needs at least two classes, got {num_classes}")
    probs = torch.full((len(target), num_classes), (1.0 - a) / (num_classes - 1), device=target.device)
    return probs.scatter(1, target.view(-1, 1), a)


def tfkd_reg_loss(s_logits: torch.Tensor, target: torch.Tensor, a: float, T: float, multiplier: float = 1.0,
                  reduction: str = "mean") -> torch.Tensor:
    """The authors' Tf-KD reg term: `multiplier * KL(softmax(p^d / T) || softmax(z_s))`, mean over N x K.

    As `loss_kd_regularization` computes it: the virtual teacher's probabilities p^d are softened by T as
    if they were logits, the student is NOT (T = 1), there is no T^2, and `nn.KLDivLoss()`'s default mean
    divides the summed KL by N x K. `reduction="batchmean"` divides by N only (K times larger)."""
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"reduction={reduction} is not one of {', '.join(KL_REDUCTIONS)}")
    p_d = virtual_teacher(target, s_logits.shape[1], a)
    q = F.softmax(p_d / T, dim=1)
    log_p_s = F.log_softmax(s_logits.float(), dim=1)
    kl_sum = F.kl_div(log_p_s, q, reduction="sum")  # "mean" spelled out: torch warns it will become batchmean
    return kl_sum / (q.numel() if reduction == "mean" else q.shape[0]) * multiplier


@register_method("tfkd_reg")
class TfKDReg(Method):
    """Yuan et al. CVPR 2020, Tf-KD reg: (1 - alpha) CE + alpha * multiplier * KL_mean(softmax(p^d / T) || p_s).

    The authors' code, not the paper's formula (`T^2 KL(p^d_T || p_s^T)`): their `loss_kd_regularization`
    softens the virtual teacher's probabilities p^d by T, leaves the student at T = 1, has no T^2, averages
    the KL over N x K (`nn.KLDivLoss()`; `method.kl_reduction=batchmean` divides by N only) and multiplies it
    by a per-model `multiplier`. The true-class probability `a` is hard-coded to 0.99 there; here a key.
    """

    needs_teacher = False
    official_code = ("yuanli2333/Teacher-free-Knowledge-Distillation my_loss_function.py::loss_kd_regularization "
                     "(`a` is a key; theirs hard-codes 0.99)")
    uses_labels = True  # a transfer set without labels refuses it

    @classmethod
    def configure(cls, cfg) -> None:
        a = cfg.method.get("a")
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1:
            raise ConfigError(f"method.a={a} is not allowed: the virtual teacher's true-class probability must lie "
                              "in [0, 1]")
        config_number(cfg.method, "multiplier", 1.0)

    def weights(self) -> dict[str, float]:
        alpha = float(self.cfg.get("alpha", 0.0))  # the base zeroes alpha without a teacher: read it here
        ce_weight = self.cfg.get("ce_weight")
        return {"ce": 1.0 - alpha if ce_weight is None else float(ce_weight), "virtual_kd": alpha}

    def method_terms(self, fw: Forward) -> dict[str, torch.Tensor]:
        multiplier = config_number(self.cfg, "multiplier", 1.0)
        return {"virtual_kd": tfkd_reg_loss(fw.s_logits, fw.labels, float(self.cfg.a), self.T, multiplier,
                                            self.kl_reduction)}
