"""Tung & Mori 2019, "Similarity-Preserving Knowledge Distillation" (RepDistiller distiller_zoo/SP.py)."""
from __future__ import annotations


import torch
import torch.nn.functional as F

from kdrun.features import layer_pairs
from kdrun.methods.base import Forward, Method
from kdrun.methods.registry import register_method
from kdrun.methods.common import full_precision

def similarity_matrix(f: torch.Tensor) -> torch.Tensor:
    """G = rownormalize(Q Q^T) with Q the (N x CHW) flattened features."""
    q = f.flatten(1).float()
    return F.normalize(q @ q.t(), p=2, dim=1)


def sp_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """`||G_s - G_t||_F^2 / N^2`; the features may differ in shape, only the batch must match."""
    n = f_s.shape[0]
    diff = similarity_matrix(f_t.detach()) - similarity_matrix(f_s)
    return diff.pow(2).sum() / (n * n)


@register_method("sp")
class SP(Method):
    """Tung & Mori 2019, Similarity-Preserving Knowledge Distillation: match the batch similarity matrices.

    Key `pairs` of [student, teacher] layers (default `[[last, last]]`: each model's last stage, as
    RepDistiller's feat[-2]; several pairs are summed, as there); the term `sp` is weighted by `beta`.
    """

    official_code = "RepDistiller distiller_zoo/SP.py"

    term_names = ("sp",)

    def __init__(self, cfg, student, teacher, num_classes):
        super().__init__(cfg, student, teacher, num_classes)
        self.pairs = layer_pairs(cfg.get("pairs"))

    def method_terms(self, fw: Forward) -> dict[str, torch.Tensor]:
        with full_precision(fw.s_logits.device):
            return {"sp": sum(sp_loss(fw.s_feats[s], fw.t_feats[t]) for s, t in self.pairs)}
