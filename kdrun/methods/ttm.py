"""Zheng & Yang 2024, "Knowledge Distillation Based on Transformed Teacher Matching" (ICLR; official code
zkxufo/TTM, distiller_zoo/ttm.py, train_student.py and helper/loops.py)."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from kdrun.methods.base import Forward, Method
from kdrun.methods.common import config_number
from kdrun.methods.registry import register_method


def transformed_teacher(t_logits: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`log(p_t^gamma / U)` and `log U`, `U = sum_k p_t(k)^gamma` the power sum of the teacher's softmax.

    Computed from `gamma * log_softmax(z_t)`, not by raising the probabilities to gamma as the official code
    does: a confident teacher's small probabilities underflow to 0 in float32 before the power would lift them
    (e^-120 becomes 0, where its power 0.1 is e^-12 = 6e-6); the same values otherwise, and the float64 values
    of the official code throughout. The teacher is a fixed target (the official code runs it under
    torch.no_grad()), so it is detached."""
    powered = gamma * F.log_softmax(t_logits.detach().float(), dim=1)
    log_norm = torch.logsumexp(powered, dim=1, keepdim=True)
    return powered - log_norm, log_norm.squeeze(1)


def ttm_divergences(s_logits: torch.Tensor, t_logits: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: `KL(p_t^gamma / U || softmax(z_s))` (the student at temperature 1) and the power sum `U`."""
    log_target, log_norm = transformed_teacher(t_logits, gamma)
    log_p_s = F.log_softmax(s_logits.float(), dim=1)
    kl = F.kl_div(log_p_s, log_target, reduction="none", log_target=True).sum(dim=1)
    return kl, log_norm.exp()


def ttm_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, gamma: float = 0.1) -> torch.Tensor:
    """TTM: `mean_n KL(p_t^gamma / sum_k p_t^gamma || softmax(z_s))`, i.e. the KL from softmax(z_t / T) with
    T = 1 / gamma to the untempered student; no T^2 factor (official TTM.forward)."""
    kl, _ = ttm_divergences(s_logits, t_logits, gamma)
    return kl.mean()


@register_method("ttm")
class TTM(Method):
    """Zheng & Yang 2024, Knowledge Distillation Based on Transformed Teacher Matching (zkxufo/TTM ttm.py).

    `ce_weight * CE + beta * TTM`: the student's plain softmax matches the teacher's probabilities raised to
    `gamma` (official `--ttm_l`, the paper's gamma = 1/T) and renormalised. The official total weighs CE by
    `-r`, an added loss (`--add`, KD at `--kd_T` by default) by `-a` and TTM by `-b`: here `ce_weight`, `alpha`
    (with `T`) and `beta`.

    Logit standardization is refused (`ls_terms` empty): there the student's z-scored logits enter a softmax
    at temperature 1, so their spread is fixed at 1 while the target softmax(gamma * z_t) has spread gamma (0.1
    by default); even a student that agrees with the teacher exactly would keep a divergence bounded away from
    0. The modifier needs one temperature shared by both sides, and putting 1/gamma on the student's side too
    turns TTM back into KD, the variant it was made to drop."""

    official_code = "zkxufo/TTM distiller_zoo/ttm.py (p_t^gamma computed in log space: no float32 underflow)"
    ls_refusal = ("its student has no temperature: its z-scored logits would stay at spread 1 against the "
                  "teacher's spread gamma, a divergence even for a perfect student")
    teacher_access = "probabilities"  # the teacher's softmax only: log p_T serves as its logits
    term_names = ("ttm",)
    default_gamma: ClassVar[float] = 0.1  # the README's TTM command (vgg13 -> vgg8)

    def __init__(self, cfg, student, teacher, num_classes):
        super().__init__(cfg, student, teacher, num_classes)
        self.gamma = config_number(cfg, "gamma", self.default_gamma, strict=True)

    def uses_teacher_outputs(self) -> bool:
        return self.distilling()  # the TTM term needs the teacher even with alpha 0

    def method_terms(self, fw: Forward) -> dict[str, torch.Tensor]:
        return {"ttm": ttm_loss(fw.s_logits, fw.t_logits, self.gamma)}
