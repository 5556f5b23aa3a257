"""Yang, Zeng, Li, Zhang, Yuan & Li 2023, "From Knowledge Distillation to Self-Knowledge Distillation: A Unified
Approach with Normalized Loss and Customized Soft Labels" (NKD, ICCV; official yzd-v/cls_KD,
mmcls/models/dis_losses/nkd.py::NKDLoss, described in nkd.md).

NKD splits KD at the target class: the student's log-probability of the target is weighted by the teacher's
(both at temperature 1), and the non-target classes are renormalised among themselves, by dropping the target
column of the logits and taking the softmax at `temp`, so their soft-CE no longer shrinks as the target
probability grows. The official NKDLoss defaults (temp 1, gamma 1.5) are its ImageNet settings
(configs/distillers/imagenet/res34_distill_res18_img.py); the defaults here are those of its CIFAR-100 config
configs/distillers/cifar100/res34_distill_res18_cifar.py (temp 3, gamma 3.5), which ships without reported
results (nkd.md reports ImageNet only). The distiller adds the loss to the student's CE, both at weight 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdrun.methods.base import Forward, Method
from kdrun.methods.common import config_number
from kdrun.methods.registry import register_method


def nkd_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor, temp: float = 1.0,
             gamma: float = 1.5) -> torch.Tensor:
    """`-mean_n t_target log s_target - gamma * temp^2 * mean_n sum_{k != target} T_k log S_k`.

    The target term is at temperature 1 (the teacher's probability detached, as the official code does); T and
    S are the softmax at `temp` over the logits with the target column removed, the renormalised non-target
    distributions. In float32, like the other logit losses."""
    s, t = s_logits.float(), t_logits.float()
    n, k = s.shape
    target = labels.view(n, 1)
    s_target = F.log_softmax(s, dim=1).gather(1, target)
    t_target = F.softmax(t, dim=1).gather(1, target).detach()
    target_term = -(t_target * s_target).mean()
    non_target = torch.ones_like(s, dtype=torch.bool).scatter_(1, target, False)
    s_others = s[non_target].view(n, k - 1) / temp
    t_others = t[non_target].view(n, k - 1) / temp
    soft_ce = (F.softmax(t_others, dim=1) * F.log_softmax(s_others, dim=1)).sum(dim=1).mean()
    return target_term - gamma * temp ** 2 * soft_ce


@register_method("nkd")
class NKD(Method):
    """Yang et al. 2023, Normalized KD: the target class weighted by the teacher, the non-targets renormalised.

    Total loss `ce_weight * CE + beta * nkd_loss(T, gamma)`: the official distiller's `ori_loss + loss_nkd`.
    Both terms read the teacher's softmax only (the non-target one over its logits less the target column, which
    a per-sample constant shift leaves unchanged too), so log-probabilities of a black box serve. Under
    `method.logit_standardize` both models' full logits are z-scored first (the target term then compares their
    softmax at 1, the non-target one at `base_T`), and `ls_weight` replaces `beta`."""

    official_code = ("yzd-v/cls_KD mmcls/models/dis_losses/nkd.py (temp and gamma of its CIFAR-100 config "
                     "configs/distillers/cifar100/res34_distill_res18_cifar.py; its results are ImageNet's)")
    teacher_access = "probabilities"
    uses_labels = True  # the target column comes from the ground truth

    term_names = ("nkd",)
    ls_terms = ("nkd",)

    def __init__(self, cfg, student, teacher, num_classes):
        super().__init__(cfg, student, teacher, num_classes)
        self.gamma = config_number(cfg, "gamma", 3.5)

    def uses_teacher_outputs(self) -> bool:
        return self.distilling()  # the NKD term needs the teacher's logits even with alpha 0

    def method_terms(self, fw: Forward) -> dict[str, torch.Tensor]:
        return {"nkd": nkd_loss(self.distil_logits(fw.s_logits), self.distil_logits(fw.t_logits), fw.labels,
                                self.T, self.gamma)}
