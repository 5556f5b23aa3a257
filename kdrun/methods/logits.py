"""Ba & Caruana 2014, "Do Deep Nets Really Need to be Deep?": regress the teacher's logits (Knowledge-Distillation-Zoo
kd_losses/logits.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdrun.methods.base import Forward, Method
from kdrun.methods.registry import register_method


def logits_loss(s_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
    """`mean((z_s - z_t)^2)` over every element (batch and classes)."""
    return F.mse_loss(s_logits.float(), t_logits.float())


@register_method("logits")
class Logits(Method):
    """Ba & Caruana 2014, Do Deep Nets Really Need to be Deep?: L2 regression on the pre-softmax logits."""

    official_code = "Knowledge-Distillation-Zoo kd_losses/logits.py (mean squared logit difference)"

    term_names = ("logits",)

    def uses_teacher_outputs(self) -> bool:
        return self.distilling()  # its own term needs the teacher's logits even with alpha 0 and no feature taps

    def method_terms(self, fw: Forward) -> dict[str, torch.Tensor]:
        return {"logits": logits_loss(fw.s_logits, fw.t_logits)}
