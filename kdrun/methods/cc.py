"""Peng et al. 2019, "Correlation Congruence for Knowledge Distillation" (RepDistiller distiller_zoo/CC.py)."""
from __future__ import annotations

import torch
from torch import nn

from kdrun.features import model_device
from kdrun.methods.base import Forward, Method
from kdrun.methods.registry import register_method
from kdrun.methods.common import config_number, single_pair


def cc_loss(e_s: torch.Tensor, e_t: torch.Tensor) -> torch.Tensor:
    """`mean_i sum_d |e_s - e_t|_{i,d} * |e_s - e_t|_{i+1,d}` over the N - 1 batch-neighbour pairs.

    This is the official code's form (the authors' code given to RepDistiller), not the paper's kernel
    correlation matrix: it couples the embedding errors of neighbouring samples in the batch."""
    delta = (e_s.float() - e_t.float()).abs()
    return (delta[:-1] * delta[1:]).sum(dim=1).mean()


class LinearEmbedding(nn.Module):
    """Flatten, then one linear layer to the shared embedding size (RepDistiller's LinearEmbed)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.linear(f.flatten(1))


@register_method("cc")
class CC(Method):
    """Peng et al. 2019, Correlation Congruence: linear embedding heads on both sides, batch-neighbour congruence.

    Keys: `pairs`, one [student, teacher] pair (default the pooled embedding), `feat_dim` (embedding size,
    128); the term `cc` is weighted by `beta`. Both heads are adapters trained with the student, as in
    RepDistiller (the teacher-side head is trainable too; the teacher network itself is frozen). That head
    sees the teacher's raw features, so its curvature grows with their square: a teacher with large pooled
    features (e.g. one trained for a single epoch) can make the default beta diverge; lower beta then.
    """

    official_code = "RepDistiller distiller_zoo/CC.py (embedding heads of crd/)"

    term_names = ("cc",)

    def __init__(self, cfg, student, teacher, num_classes):
        super().__init__(cfg, student, teacher, num_classes)
        self.pair = single_pair(cfg, "cc")
        self.feat_dim = config_number(cfg, "feat_dim", 128, minimum=1, integer=True)

    def student_layers(self) -> list[str]:
        return [self.pair[0]]

    def teacher_layers(self) -> list[str]:
        return [self.pair[1]]

    def build(self, s_shapes, t_shapes) -> None:
        s_name, t_name = self.pair
        device = model_device(self.student)
        self.embed_s = LinearEmbedding(s_shapes[s_name].numel(), self.feat_dim).to(device)
        self.embed_t = LinearEmbedding(t_shapes[t_name].numel(), self.feat_dim).to(device)

    def method_terms(self, fw: Forward) -> dict[str, torch.Tensor]:
        s_name, t_name = self.pair
        return {"cc": cc_loss(self.embed_s(fw.s_feats[s_name]), self.embed_t(fw.t_feats[t_name]))}
