"""Park, Kim, Lu & Cho 2019, "Relational Knowledge Distillation" (RepDistiller distiller_zoo/RKD.py)."""
from __future__ import annotations


import torch
import torch.nn.functional as F

from kdrun.features import layer_pairs
from kdrun.methods.base import Forward, Method
from kdrun.methods.common import config_number, full_precision
from kdrun.methods.registry import register_method

# Squared distances are floored here before the square root, as in the official code, so that coinciding
# points (the diagonal, or a collapsed embedding) give a finite gradient instead of 1 / sqrt(0).
SQUARED_DISTANCE_FLOOR = 1e-12


def pairwise_distances(e: torch.Tensor) -> torch.Tensor:
    """Euclidean distance matrix of the rows of `e`, exactly zero on the diagonal."""
    diff = e.unsqueeze(0) - e.unsqueeze(1)
    dist = diff.pow(2).sum(-1).clamp_min(SQUARED_DISTANCE_FLOOR).sqrt()
    off_diagonal = 1.0 - torch.eye(len(e), device=e.device, dtype=dist.dtype)
    return dist * off_diagonal


def normalized_distances(e: torch.Tensor) -> torch.Tensor:
    """psi_D: distances divided by their mean over the distinct pairs (the N (N - 1) off-diagonal entries).

    The official code averages `d[d > 0]`; with the floor above every off-diagonal distance is positive, so
    dividing the sum by N (N - 1) is the same number without a data-dependent mask (no host sync)."""
    dist = pairwise_distances(e)
    pairs = max(len(e) * (len(e) - 1), 1)
    mean = dist.sum() / pairs
    return dist / mean.clamp_min(SQUARED_DISTANCE_FLOOR ** 0.5)


def triplet_angles(e: torch.Tensor) -> torch.Tensor:
    """psi_A[i, j, k] = <unit(e_j - e_i), unit(e_k - e_i)> for all N^3 triplets (zero where a difference is zero)."""
    unit = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return torch.bmm(unit, unit.transpose(1, 2))


def rkd_distance_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 (Huber, delta 1) between the normalised distance matrices, mean over all N^2 entries."""
    s, t = f_s.flatten(1).float(), f_t.flatten(1).float().detach()
    return F.smooth_l1_loss(normalized_distances(s), normalized_distances(t))


def rkd_angle_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 (Huber, delta 1) between the triplet-angle tensors, mean over all N^3 entries."""
    s, t = f_s.flatten(1).float(), f_t.flatten(1).float().detach()
    return F.smooth_l1_loss(triplet_angles(s), triplet_angles(t))


def rkd_loss(f_s: torch.Tensor, f_t: torch.Tensor, w_dist: float = 25.0, w_angle: float = 50.0) -> torch.Tensor:
    """`w_dist * L_distance + w_angle * L_angle` on (N x D) embeddings (features are flattened per sample)."""
    return w_dist * rkd_distance_loss(f_s, f_t) + w_angle * rkd_angle_loss(f_s, f_t)


@register_method("rkd")
class RKD(Method):
    """Park et al. 2019, Relational Knowledge Distillation: distance and angle relations of the pooled embedding.

    Keys: `pairs` of [student, teacher] layers (default the pooled embedding; several pairs are summed),
    `w_dist`, `w_angle`; the term `rkd` is weighted by `beta`. As in the official code, the means run over
    all N^2 pairs and N^3 triplets, degenerate ones (i = j, j = k) included.
    """

    official_code = "RepDistiller distiller_zoo/RKD.py"

    term_names = ("rkd",)

    def __init__(self, cfg, student, teacher, num_classes):
        super().__init__(cfg, student, teacher, num_classes)
        self.pairs = layer_pairs(cfg.get("pairs"))
        self.w_dist = config_number(cfg, "w_dist", 25.0)
        self.w_angle = config_number(cfg, "w_angle", 50.0)

    def method_terms(self, fw: Forward) -> dict[str, torch.Tensor]:
        with full_precision(fw.s_logits.device):
            return {"rkd": sum(rkd_loss(fw.s_feats[s], fw.t_feats[t], self.w_dist, self.w_angle)
                               for s, t in self.pairs)}
