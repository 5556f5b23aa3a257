"""Ahn, Hu, Damianou, Lawrence & Dai 2019, "Variational Information Distillation for Knowledge Transfer"
(RepDistiller distiller_zoo/VID.py)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.errors import ConfigError
from kdrun.features import model_device
from kdrun.methods.base import Forward, Method
from kdrun.methods.registry import register_method
from kdrun.methods.common import config_number, pool_to_common_size, require_feature_maps, stage_pairs


def conv1x1(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, bias=False)


class VIDLoss(nn.Module):
    """-log q(t | s) for a Gaussian q with mean `regressor(s)` and a learned per-channel variance, averaged
    over every element (a lower bound on the mutual information, up to constants).

    The variance is `softplus(log_scale) + eps`, with `log_scale` initialised so that it starts at exactly
    `init_pred_var`; the regressor is three 1x1 convs (no bias) with ReLUs and PyTorch's default init,
    as in the official code.
    """

    def __init__(self, in_channels: int, mid_channels: int, target_channels: int, init_pred_var: float = 5.0,
                 eps: float = 1e-5):
        super().__init__()
        self.regressor = nn.Sequential(conv1x1(in_channels, mid_channels), nn.ReLU(),
                                       conv1x1(mid_channels, mid_channels), nn.ReLU(),
                                       conv1x1(mid_channels, target_channels))
        # softplus^-1(init_pred_var - eps), so that softplus(log_scale) + eps == init_pred_var
        self.log_scale = nn.Parameter(torch.full((target_channels,), math.log(math.expm1(init_pred_var - eps))))
        self.eps = eps

    def variance(self) -> torch.Tensor:
        return F.softplus(self.log_scale) + self.eps

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        f_s, f_t = pool_to_common_size(f_s, f_t)
        mean = self.regressor(f_s)
        var = self.variance().view(1, -1, 1, 1)
        return (0.5 * ((mean - f_t) ** 2 / var + torch.log(var))).mean()


@register_method("vid")
class VID(Method):
    """Ahn et al. 2019, Variational Information Distillation: Gaussian likelihood of the teacher's features.

    Keys: `pairs` (student, teacher) layers, default `auto`: every stage output, as RepDistiller's feat[1:-1]
    (s1..s3 for CIFAR ResNets, WRNs and ShuffleNets; s1..s4 for VGG, MobileNetV2 and ResNet18/34/50);
    `init_pred_var` (5.0) and `eps` (1e-5) of the variance. One `VIDLoss` per pair with mid channels = the
    teacher's channels, as in RepDistiller; its regressor and `log_scale` train with the student. The term
    `vid` is the sum over pairs, weighted by `beta`. A student and teacher with different stage counts
    (resnet32x4 -> vgg8: 3 and 4) are refused in one line naming both counts: give `method.pairs`
    (RepDistiller's zip would silently pair the first k).
    """

    term_names = ("vid",)
    official_code = ("RepDistiller distiller_zoo/VID.py, feat[1:-1] (train_student.py); unequal stage counts "
                     "refused instead of zip's first-k pairing")

    def __init__(self, cfg, student, teacher, num_classes):
        super().__init__(cfg, student, teacher, num_classes)
        self.pairs = stage_pairs(cfg, "vid", student, teacher)
        self.init_pred_var = config_number(cfg, "init_pred_var", 5.0, strict=True)
        self.eps = config_number(cfg, "eps", 1e-5, strict=True)
        if self.init_pred_var <= self.eps:
            raise ConfigError(f"method.init_pred_var={self.init_pred_var} is not allowed: must exceed "
                              f"method.eps={self.eps}")
        self.vid_losses = nn.ModuleList()

    def build(self, s_shapes, t_shapes) -> None:
        for s, t in self.pairs:
            require_feature_maps("vid", (s, t), s_shapes[s], t_shapes[t])
            t_channels = t_shapes[t][0]
            self.vid_losses.append(VIDLoss(s_shapes[s][0], t_channels, t_channels, self.init_pred_var, self.eps))
        self.vid_losses.to(model_device(self.student))  # built after the method moved to its device

    def method_terms(self, fw: Forward) -> dict[str, torch.Tensor]:
        losses = [vid(fw.s_feats[s], fw.t_feats[t]) for vid, (s, t) in zip(self.vid_losses, self.pairs)]
        return {"vid": torch.stack(losses).sum()}
