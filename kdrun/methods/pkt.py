"""Passalis & Tefas 2018, "Learning Deep Representations with Probabilistic Knowledge Transfer"
(RepDistiller distiller_zoo/PKT.py, from the authors' code)."""
from __future__ import annotations

import torch

from kdrun.features import layer_pairs
from kdrun.methods.base import Forward, Method
from kdrun.methods.registry import register_method
from kdrun.methods.common import config_number, full_precision


def cosine_conditional_probabilities(f: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """P[i, j] = K(i, j) / sum_j K(i, j), K = (cos + 1) / 2 on l2-normalised rows (the diagonal included).

    The norm gets `+ eps` rather than a clamp, as in the official code, so a zero row maps to zero."""
    x = f.flatten(1).float()
    x = x / (x.norm(dim=1, keepdim=True) + eps)
    kernel = (x @ x.t() + 1.0) / 2.0
    return kernel / kernel.sum(dim=1, keepdim=True)


def pkt_loss(f_s: torch.Tensor, f_t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """`mean(P_t * log((P_t + eps) / (P_s + eps)))` over all N^2 entries (a KL divergence divided by N^2)."""
    p_s = cosine_conditional_probabilities(f_s, eps)
    p_t = cosine_conditional_probabilities(f_t.detach(), eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


@register_method("pkt")
class PKT(Method):
    """Passalis & Tefas 2018, Probabilistic Knowledge Transfer: match cosine-kernel conditional probabilities.

    Keys: `pairs` of [student, teacher] layers (default the pooled embedding, as RepDistiller's feat[-1];
    several pairs are summed), `eps`; the term `pkt` is weighted by `beta`.
    """

    official_code = "RepDistiller distiller_zoo/PKT.py"

    term_names = ("pkt",)

    def __init__(self, cfg, student, teacher, num_classes):
        super().__init__(cfg, student, teacher, num_classes)
        self.pairs = layer_pairs(cfg.get("pairs"))
        self.eps = config_number(cfg, "eps", 1e-7, strict=True)

    def method_terms(self, fw: Forward) -> dict[str, torch.Tensor]:
        with full_precision(fw.s_logits.device):
            return {"pkt": sum(pkt_loss(fw.s_feats[s], fw.t_feats[t], self.eps) for s, t in self.pairs)}
