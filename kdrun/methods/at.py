"""Zagoruyko & Komodakis 2017, "Paying More Attention to Attention" (RepDistiller distiller_zoo/AT.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdrun.methods.base import Forward, Method
from kdrun.methods.common import config_number, pool_to_common_size, require_feature_maps, stage_pairs
from kdrun.methods.registry import register_method


def attention_map(f: torch.Tensor, p: float = 2) -> torch.Tensor:
    """`l2normalize(flatten(mean_c f^p))`: N x HW."""
    return F.normalize(f.float().pow(p).mean(1).flatten(1), dim=1)


def at_loss(f_s: torch.Tensor, f_t: torch.Tensor, p: float = 2) -> torch.Tensor:
    """`mean((a(f_s) - a(f_t))^2)` over batch and positions for one pair, after pooling to the smaller size."""
    f_s, f_t = pool_to_common_size(f_s, f_t)
    return (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()


@register_method("at")
class AT(Method):
    """Zagoruyko & Komodakis 2017, Paying More Attention to Attention: match spatial attention maps.

    As RepDistiller: the map is `f^p` averaged over channels (the paper writes |f|^p; equal for the default
    p 2), the pair losses are summed, and the larger map is average-pooled to the smaller one's size.

    Default `pairs: auto`: every stage output, as RepDistiller's feat[1:-1] (s1..s3 for CIFAR ResNets, WRNs and
    ShuffleNets; s1..s4 for VGG, MobileNetV2 and ResNet18/34/50); explicit `method.pairs` are used as given.
    A student and teacher with different stage counts (resnet32x4 -> vgg8: 3 and 4) are refused in one
    line naming both counts: give `method.pairs` (RepDistiller's zip would silently pair the first k)."""

    term_names = ("at",)
    official_code = ("RepDistiller distiller_zoo/AT.py, feat[1:-1] (train_student.py); unequal stage counts "
                     "refused instead of zip's first-k pairing")

    def __init__(self, cfg, student, teacher, num_classes):
        super().__init__(cfg, student, teacher, num_classes)
        self.pairs = stage_pairs(cfg, "at", student, teacher)
        self.p = config_number(cfg, "p", 2.0, strict=True)

    def build(self, s_shapes, t_shapes) -> None:
        for s, t in self.pairs:
            require_feature_maps("at", (s, t), s_shapes[s], t_shapes[t])

    def method_terms(self, fw: Forward) -> dict[str, torch.Tensor]:
        return {"at": sum(at_loss(fw.s_feats[s], fw.t_feats[t], self.p) for s, t in self.pairs)}
