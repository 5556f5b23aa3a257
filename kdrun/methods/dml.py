"""Zhang, Xiang, Hospedales & Lu 2018, "Deep Mutual Learning" (CVPR).

Also home of `PeerMethod`, the base of every method that trains several peers together from scratch
(`dml`, `kdcl`): it reads `method.peers`, builds the extra peers and reports each one's test accuracy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import ListConfig
from torch import nn

from kdrun.errors import ConfigError
from kdrun.methods.base import Method, StepOutput
from kdrun.methods.kd import kd_loss
from kdrun.methods.registry import register_method
from kdrun.models import MODELS, create_model

MUTUAL_REDUCTIONS = ("sum", "mean")


def check_peers(cfg) -> list[str]:
    """`method.peers` must list at least two registered models; returns it as a Python list."""
    peers = cfg.method.get("peers")
    if not isinstance(peers, (list, ListConfig)) or len(peers) < 2:
        raise ConfigError(f"method.peers={peers} is not allowed: list at least two models, e.g. [resnet8,resnet8]")
    for name in peers:
        if name not in MODELS:
            raise ConfigError(MODELS.unknown_message(name, "method.peers"))
    return [str(name) for name in peers]


class PeerMethod(Method):
    """Several peers trained together, no teacher. The run's student is peer 0 (with its model options), so
    `method.peers[0]` must name the student's model (the YAML default lists the student twice); the others
    are built from `method.peers[1:]` with default options. Every peer is evaluated every epoch.

    All peers sit in this module, so the runner's one optimizer covers them. SGD keeps its momentum and
    weight decay per parameter and each peer's parameters get gradients from its own loss only (the other
    peers' outputs are detached), so one optimizer over all peers equals one optimizer per peer.
    """

    needs_teacher = False

    @classmethod
    def configure(cls, cfg) -> None:
        peers = check_peers(cfg)
        if peers[0] != cfg.student.name:  # the student IS the first peer: a different name is a contradiction
            student = cfg.student.name
            raise ConfigError(f"method.peers=[{','.join(peers)}] is not allowed with student={student}: the "
                              f"first peer is the run's student, so start the list with {student} "
                              f"or set student={peers[0]}")

    def __init__(self, cfg, student: nn.Module, teacher: nn.Module | None, num_classes: int):
        super().__init__(cfg, student, teacher, num_classes)
        self.peer_names = [str(name) for name in cfg.peers]
        self.others = nn.ModuleList()  # peers 1..K-1, built in `build` once the input shape is known

    def build(self, s_shapes, t_shapes) -> None:
        device = next(self.student.parameters()).device
        in_channels = self.input_shape[0]
        self.others.extend(create_model(name, self.num_classes, in_channels).to(device)
                           for name in self.peer_names[1:])

    @property
    def peers(self) -> list[nn.Module]:
        return [self.student, *self.others]

    def eval_models(self) -> dict[str, nn.Module]:
        return {f"peer{i}_{name}": model for i, (name, model) in enumerate(zip(self.peer_names, self.peers))}

    def peer_terms(self, logits: list[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss terms of all peers from their logits (peer 0 first); each subclass defines its own."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> StepOutput:
        logits = [peer(images) for peer in self.peers]
        return StepOutput(self.peer_terms(logits, labels), logits[0])


def check_mutual_reduction(reduction) -> None:
    if reduction not in MUTUAL_REDUCTIONS:
        raise ConfigError(f"method.mutual_reduction={reduction} is not allowed: one of {', '.join(MUTUAL_REDUCTIONS)}")


def dml_loss(logits_list: list[torch.Tensor], target: torch.Tensor, T: float = 1.0,
             reduction: str = "sum") -> dict[str, torch.Tensor]:
    """DML's loss of all peers, as two terms each summed over the K peers:
    `ce = sum_i CE(z_i, y)` and `dml = sum_i r sum_{j != i} T^2 KL(p_j^T || p_i^T)` (batchmean), with every
    p_j detached, so peer i's parameters get gradients from peer i's loss alone. `reduction="sum"` (r = 1)
    is the official code (`train_models.py::_tower_loss` adds each of the K-1 KL terms to peer i's loss),
    `"mean"` (r = 1/(K-1)) the paper's average; with two peers they agree. The total objective is `ce + dml`."""
    check_mutual_reduction(reduction)
    k = len(logits_list)
    if k < 2:
        raise ValueError(f"dml_loss needs at least two peers, got {k}")
    ce = sum(F.cross_entropy(z.float(), target) for z in logits_list)
    mutual = sum(kd_loss(z_i, z_j.detach(), T)
                 for i, z_i in enumerate(logits_list) for j, z_j in enumerate(logits_list) if j != i)
    return {"ce": ce, "dml": mutual / (k - 1) if reduction == "mean" else mutual}


@register_method("dml")
class DML(PeerMethod):
    """Zhang et al. 2018, Deep Mutual Learning: K peers, each CE + the KL(p_j || p_i) to the others.

    `method.mutual_reduction`: `sum` of the K-1 KL terms (the official TensorFlow code, the default) or
    their `mean` (the paper's 1/(K-1)). The code updates the peers in turn, each on its own batch and seeing
    the others' latest weights; here all peers step together on one batch with the others' outputs detached
    (the common simultaneous variant).
    """

    official_code = ("YingZhangDUT/Deep-Mutual-Learning train_models.py (TensorFlow; KL(p_j || p_i) batchmean, "
                     "summed over the K-1 peers: mutual_reduction=sum; mean is the paper's); differences: peers "
                     "step together on one batch, not in turn on fresh batches; no 1e-8 inside the log")
    uses_labels = True  # a transfer set without labels refuses it

    @classmethod
    def configure(cls, cfg) -> None:
        super().configure(cfg)
        check_mutual_reduction(cfg.method.get("mutual_reduction"))

    def weights(self) -> dict[str, float]:
        return {"ce": self.ce_weight(), "dml": 1.0}

    def peer_terms(self, logits, labels):
        return dml_loss(logits, labels, self.T, str(self.cfg.mutual_reduction))
