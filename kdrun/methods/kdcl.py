"""Guo et al. CVPR 2020, "Online Knowledge Distillation via Collaborative Learning" (KDCL)."""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from kdrun.errors import ConfigError
from kdrun.methods.dml import PeerMethod
from kdrun.methods.kd import kd_loss
from kdrun.methods.registry import register_method

KDCL_MODES = ("naive", "linear", "minlogit")
LINE_SEARCH_STEPS = 24  # bisection halvings: the step is then exact to 2^-24 of its range, float32 precision
PAIR_SWEEPS = 8         # passes over all peer pairs when there are more than two peers


def check_mode(mode) -> None:
    if mode not in KDCL_MODES:
        raise ConfigError(f"method.mode={mode} is not allowed: one of {', '.join(KDCL_MODES)}")


def naive_teacher(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per sample, the logits of the peer with the lowest cross-entropy on that sample (z: m x N x K).
    The paper writes the ensemble for one input x, so the choice is made sample by sample."""
    ce = torch.stack([F.cross_entropy(z_i, target, reduction="none") for z_i in z])  # m x N
    best = ce.argmin(0)
    return z[best, torch.arange(z.shape[1], device=z.device)]


def minlogit_teacher(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Elementwise min over peers of `z_i - z_i[target]`: each class at the smallest gap any peer puts
    between it and the true class, so the true class sits at 0 and the others below it."""
    target_logit = z.gather(2, target.view(1, -1, 1).expand(z.shape[0], -1, 1))
    return (z - target_logit).amin(0)


def linear_weights(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Weights w on the probability simplex minimising the batch's mean CE of `sum_i w_i z_i` (z: m x N x K).

    The simplex is needed: unconstrained, the minimum is unbounded whenever the weighted logits classify the
    batch correctly (scaling them drives the CE to zero). CE of a linear function of w is convex, so exact
    line searches moving weight between two peers at a time (sequential minimal optimisation) converge to the
    minimum; with two peers a single line search is the exact answer. Each line search bisects on the
    directional derivative, which is monotone along the line by convexity. Fixed iteration counts keep it
    free of host-device synchronisation.
    """
    m = z.shape[0]
    z_target = z.gather(2, target.view(1, -1, 1).expand(m, -1, 1)).squeeze(2)  # m x N
    w = torch.full((m,), 1.0 / m, dtype=z.dtype, device=z.device)
    sweeps = 1 if m == 2 else PAIR_SWEEPS
    for _ in range(sweeps):
        for i, j in itertools.combinations(range(m), 2):
            direction, direction_target = z[i] - z[j], z_target[i] - z_target[j]
            mixed = torch.einsum("m,mnk->nk", w, z)
            low, high = -w[i], w[j]  # move t from peer j to peer i, keeping both weights >= 0
            for _ in range(LINE_SEARCH_STEPS):
                mid = (low + high) / 2
                probs = (mixed + mid * direction).softmax(1)
                slope = ((probs * direction).sum(1) - direction_target).mean()
                rising = slope > 0
                high, low = torch.where(rising, mid, high), torch.where(rising, low, mid)
            step = (low + high) / 2
            shift = torch.zeros_like(w)
            shift[i], shift[j] = step, -step
            w = w + shift
    return w


def linear_teacher(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The batch's CE-optimal convex combination of the peers' logits (weights solved per batch)."""
    return torch.einsum("m,mnk->nk", linear_weights(z, target), z)


ENSEMBLES = {"naive": naive_teacher, "linear": linear_teacher, "minlogit": minlogit_teacher}


@torch.no_grad()
def kdcl_teacher(logits_list: list[torch.Tensor], target: torch.Tensor, mode: str) -> torch.Tensor:
    """The ensemble teacher's logits `z^T = h(z_1..z_m)` (N x K, no gradient) for `mode` naive, linear or
    minlogit; an unknown mode raises ConfigError naming `method.mode`."""
    check_mode(mode)
    z = torch.stack([logits.detach().float() for logits in logits_list])
    with torch.autocast(z.device.type, enabled=False):  # the linear solver's einsums would run in bf16/fp16
        return ENSEMBLES[mode](z, target)


def kdcl_loss(logits_list: list[torch.Tensor], target: torch.Tensor, mode: str, T: float) -> dict[str, torch.Tensor]:
    """Every peer's `CE + T^2 KL(softmax(z^T/T) || softmax(z_i/T))` (batchmean), as two terms summed over
    the peers: `ce` and `kdcl`."""
    teacher = kdcl_teacher(logits_list, target, mode)
    return {"ce": sum(F.cross_entropy(z.float(), target) for z in logits_list),
            "kdcl": sum(kd_loss(z, teacher, T) for z in logits_list)}


@register_method("kdcl")
class KDCL(PeerMethod):
    """Guo et al. CVPR 2020, KDCL: peers learn from an ensemble teacher made of their own logits (online KD).

    `method.mode` picks the ensemble: naive (per sample, the peer with the lowest CE), linear (the CE-optimal
    convex combination, solved per batch) or minlogit. Unlike the paper, all peers see the same augmented
    batch (the paper gives each peer its own augmentation of the image), and the paper's validation-set
    variant (KDCL-General) is not offered.
    """

    official_code = "- (no official code was released; follows the paper, all peers on one augmented batch)"
    uses_labels = True  # a transfer set without labels refuses it

    @classmethod
    def configure(cls, cfg) -> None:
        super().configure(cfg)
        check_mode(cfg.method.get("mode"))

    def weights(self) -> dict[str, float]:
        return {"ce": self.ce_weight(), "kdcl": 1.0}

    def peer_terms(self, logits, labels):
        return kdcl_loss(logits, labels, self.cfg.mode, self.T)
