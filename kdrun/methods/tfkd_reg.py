"""Yuan, Tay, Li, Wang & Feng CVPR 2020, "Revisiting Knowledge Distillation via Label Smoothing Regularization":
Tf-KD regularisation, KD from a hand-made virtual teacher instead of a trained one."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdrun.errors import ConfigError
from kdrun.methods.base import Forward, Method
from kdrun.methods.registry import register_method


def virtual_teacher(target: torch.Tensor, num_classes: int, a: float) -> torch.Tensor:
    """The virtual teacher's distribution (N x K): `a` on the true class, `(1 - a) / (K - 1)` on each other."""
    if num_classes < 2:
        raise ValueError(f"a virtual teacher needs at least two classes, got {num_classes}")
    probs = torch.full((len(target), num_classes), (1.0 - a) / (num_classes - 1), device=target.device)
    return probs.scatter(1, target.view(-1, 1), a)


def tfkd_reg_loss(s_logits: torch.Tensor, target: torch.Tensor, a: float, T: float) -> torch.Tensor:
    """`T^2 KL(p^d || softmax(z_s / T))`, batchmean, with p^d the virtual teacher (not temperature-scaled)."""
    p_d = virtual_teacher(target, s_logits.shape[1], a)
    log_p_s = F.log_softmax(s_logits.float() / T, dim=1)
    return F.kl_div(log_p_s, p_d, reduction="batchmean") * (T * T)


@register_method("tfkd_reg")
class TfKDReg(Method):
    """Yuan et al. CVPR 2020, Tf-KD reg: (1 - alpha) CE + alpha T^2 KL(p^d || p_s^T), p^d a virtual teacher.

    As the paper writes it. The authors' code differs: it softens the virtual teacher itself
    (softmax(p^d / T)), leaves the student at T = 1, divides the KL by the number of classes too
    (nn.KLDivLoss's default mean) and multiplies it by a per-experiment `multiplier`.
    """

    needs_teacher = False

    @classmethod
    def configure(cls, cfg) -> None:
        a = cfg.method.get("a")
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1:
            raise ConfigError(f"method.a={a} is not allowed: the virtual teacher's true-class probability must lie "
                              "in [0, 1]")

    def weights(self) -> dict[str, float]:
        alpha = float(self.cfg.get("alpha", 0.0))  # the base zeroes alpha without a teacher: read it here
        ce_weight = self.cfg.get("ce_weight")
        return {"ce": 1.0 - alpha if ce_weight is None else float(ce_weight), "virtual_kd": alpha}

    def method_terms(self, fw: Forward) -> dict[str, torch.Tensor]:
        return {"virtual_kd": tfkd_reg_loss(fw.s_logits, fw.labels, float(self.cfg.a), self.T)}
