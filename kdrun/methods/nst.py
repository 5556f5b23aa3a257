"""Huang & Wang 2017, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer" (RepDistiller
distiller_zoo/NST.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdrun.features import layer_pairs
from kdrun.methods.common import require_feature_maps, pool_to_common_size
from kdrun.methods.base import Forward, Method
from kdrun.methods.registry import register_method


def poly_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`(a_i . b_j)^2` for every channel pair of each sample: N x C_b x C_a."""
    return torch.einsum("nid,njd->nji", a, b).pow(2)


def nst_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Squared MMD with the polynomial kernel between the channels' normalised activation patterns:
    `mean k(t,t) + mean k(s,s) - 2 mean k(s,t)` (each mean over batch and channel pairs)."""
    f_s, f_t = pool_to_common_size(f_s.float(), f_t.float())
    s = F.normalize(f_s.flatten(2), dim=2)
    t = F.normalize(f_t.flatten(2), dim=2)
    return poly_kernel(t, t).mean() + poly_kernel(s, s).mean() - 2 * poly_kernel(s, t).mean()


@register_method("nst")
class NST(Method):
    """Huang & Wang 2017, Like What You Like: Neuron Selectivity Transfer (MMD, polynomial kernel).

    As RepDistiller: each channel's activations over positions are l2-normalised, the kernel is (a.b)^2, and
    the larger map is average-pooled to the smaller one's size. The default pairs every stage (s1, s2, s3), summed, as RepDistiller's feat[1:-1]."""

    term_names = ("nst",)

    def __init__(self, cfg, student, teacher, num_classes):
        super().__init__(cfg, student, teacher, num_classes)
        self.pairs = layer_pairs(cfg.get("pairs"))

    def build(self, s_shapes, t_shapes) -> None:
        for s, t in self.pairs:
            require_feature_maps("nst", (s, t), s_shapes[s], t_shapes[t])

    def method_terms(self, fw: Forward) -> dict[str, torch.Tensor]:
        return {"nst": sum(nst_loss(fw.s_feats[s], fw.t_feats[t]) for s, t in self.pairs)}
