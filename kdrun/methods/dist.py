"""Huang, You, Wang, Qian & Xu 2022, "Knowledge Distillation from A Stronger Teacher" (DIST, NeurIPS; official
hunto/DIST_KD, whose classification/ submodule hunto/image_classification_sota holds lib/models/losses/dist_kd.py).

DIST matches relations rather than the probabilities themselves: the Pearson correlation between the student's
and the teacher's class probabilities of each sample (inter-class relation), and between their probabilities
of each class across the batch (intra-class relation). The CIFAR-100 defaults are those of
configs/strategies/distill/dist_cifar.yaml (`kd: dist_t4`: tau 4, beta = gamma = 1 in lib/models/losses/
kd_loss.py; `ori_loss_weight` 1, `kd_loss_weight` 2): the config that DIST_KD's README runs for its
CIFAR-100 table.
"""
from __future__ import annotations

import torch

from kdrun.methods.base import Forward, Method
from kdrun.methods.common import config_number
from kdrun.methods.registry import register_method

PEARSON_EPS = 1e-8  # the official cosine_similarity's eps, added to the product of the norms


def pearson_correlation(a: torch.Tensor, b: torch.Tensor, eps: float = PEARSON_EPS) -> torch.Tensor:
    """Row-wise Pearson correlation of two N x K matrices: the cosine of the mean-centred rows, with `eps` added
    to the product of the norms as the official code does, so a constant row correlates 0, not NaN."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def inter_class_relation(p_s: torch.Tensor, p_t: torch.Tensor) -> torch.Tensor:
    """`1 - mean_i pearson(p_s[i, :], p_t[i, :])`: over each sample's class probabilities (N x K inputs)."""
    return 1 - pearson_correlation(p_s, p_t).mean()


def intra_class_relation(p_s: torch.Tensor, p_t: torch.Tensor) -> torch.Tensor:
    """`1 - mean_k pearson(p_s[:, k], p_t[:, k])`: over each class's probabilities across the batch. With one
    sample every centred column is 0, so the term is the constant 1 (no gradient), as the official module gives."""
    return inter_class_relation(p_s.transpose(0, 1), p_t.transpose(0, 1))


def dist_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, beta: float = 1.0, gamma: float = 1.0,
              tau: float = 1.0) -> torch.Tensor:
    """`tau^2 * (beta * inter + gamma * intra)` on `softmax(z / tau)` of both models, in float32: the Pearson
    terms are differences of near-equal sums that bf16 would drown."""
    p_s = (s_logits.float() / tau).softmax(dim=1)
    p_t = (t_logits.float() / tau).softmax(dim=1)
    return tau ** 2 * (beta * inter_class_relation(p_s, p_t) + gamma * intra_class_relation(p_s, p_t))


@register_method("dist")
class DIST(Method):
    """Huang et al. 2022, Knowledge Distillation from A Stronger Teacher: Pearson relations of the probabilities.

    Total loss `ce_weight * CE + beta * dist_loss(dist_beta, dist_gamma, T)`, as the official KDLoss wrapper's
    `ori_loss_weight * CE + kd_loss_weight * DIST`. The loss reads the teacher's softmax only, so a constant
    shift of its logits (log-probabilities of a black box) leaves it unchanged. Under `method.logit_standardize`
    both models' logits are z-scored before the softmax at `base_T`, and `ls_weight` replaces `beta`."""

    official_code = ("hunto/DIST_KD classification/lib/models/losses/dist_kd.py (the submodule "
                     "hunto/image_classification_sota; weights of configs/strategies/distill/dist_cifar.yaml; "
                     "computed in float32)")
    teacher_access = "probabilities"

    term_names = ("dist",)
    ls_terms = ("dist",)

    def __init__(self, cfg, student, teacher, num_classes):
        super().__init__(cfg, student, teacher, num_classes)
        self.dist_beta = config_number(cfg, "dist_beta", 1.0)
        self.dist_gamma = config_number(cfg, "dist_gamma", 1.0)

    def uses_teacher_outputs(self) -> bool:
        return self.distilling()  # the DIST term needs the teacher's logits even with alpha 0

    def method_terms(self, fw: Forward) -> dict[str, torch.Tensor]:
        return {"dist": dist_loss(self.distil_logits(fw.s_logits), self.distil_logits(fw.t_logits),
                                  self.dist_beta, self.dist_gamma, self.T)}
