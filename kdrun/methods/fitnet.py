"""Romero et al. 2015, "FitNets: Hints for Thin Deep Nets" (RepDistiller distiller_zoo/FitNet.py,
models/util.py::ConvReg)."""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.features import layer_pairs, pair_error, parameters_feeding
from kdrun.methods.base import Forward, Method, Stage
from kdrun.methods.common import config_number
from kdrun.methods.registry import register_method

HINT_STAGE = "hint"


def hint_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """`mean((f_s - f_t)^2)` over every element; `f_s` is the student's hint already through the regressor."""
    return F.mse_loss(f_s.float(), f_t.float())


def regressor_conv(s_shape, t_shape) -> nn.Module | None:
    """The conv mapping a C_s x H_s x W_s map onto C_t x H_t x W_t, as RepDistiller's ConvReg chooses it:
    stride 2 to halve, a transposed conv to double, else a valid conv shrinking by H_s - H_t (None when the
    student's map is smaller in any other way)."""
    (s_c, s_h, s_w), (t_c, t_h, t_w) = s_shape, t_shape
    if s_h == 2 * t_h and s_w == 2 * t_w:
        return nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
    if 2 * s_h == t_h and 2 * s_w == t_w:
        return nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
    if s_h >= t_h and s_w >= t_w:
        return nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
    return None


class ConvRegressor(nn.Sequential):
    """conv + BN (+ ReLU): maps a student feature map onto the teacher's channels and spatial size."""

    def __init__(self, conv: nn.Module, t_channels: int, relu: bool):
        layers = [conv, nn.BatchNorm2d(t_channels)]
        super().__init__(*layers, *([nn.ReLU(inplace=True)] if relu else []))


REGRESSIBLE = ("needs C x H x W maps on both sides, with the student's H, W at least the teacher's, "
               "or exactly half of them")


def make_regressor(method: str, pair: tuple[str, str], s_shape, t_shape, relu: bool) -> ConvRegressor:
    """A regressor for one pair, or the one-line refusal naming both shapes."""
    conv = regressor_conv(s_shape, t_shape) if len(s_shape) == 3 and len(t_shape) == 3 else None
    if conv is None:
        raise pair_error(method, pair, s_shape, t_shape, REGRESSIBLE)
    return ConvRegressor(conv, t_shape[0], relu)


@register_method("fitnet")
class FitNet(Method):
    """Romero et al. 2015, FitNets: Hints for Thin Deep Nets: a regressor maps the student's hint onto the teacher's.

    As RepDistiller, the hint term is trained jointly with CE by default (`hint_epochs: 0`); the paper's first
    stage, which trains the student up to the hint layer plus the regressor on the hint loss alone, runs for
    `hint_epochs` epochs as a stage of its own, at the run's lr held constant. The hint term has weight `beta`
    in both stages."""

    official_code = "RepDistiller distiller_zoo/FitNet.py + models/util.py::ConvReg (optional hint stage of the paper)"

    term_names = ("hint",)

    def __init__(self, cfg, student, teacher, num_classes):
        super().__init__(cfg, student, teacher, num_classes)
        self.pairs = layer_pairs(cfg.get("pairs"))
        self.hint_epochs = config_number(cfg, "hint_epochs", 0, integer=True)
        self.regressors = nn.ModuleList()

    def build(self, s_shapes, t_shapes) -> None:
        for s, t in self.pairs:
            self.regressors.append(make_regressor("fitnet", (s, t), s_shapes[s], t_shapes[t], relu=True))

    def stages(self, epochs: int) -> list[Stage]:
        hint = [Stage(HINT_STAGE, self.hint_epochs, constant_lr=True)] if self.hint_epochs > 0 else []
        return hint + [Stage("main", epochs)]

    def weights(self) -> dict[str, float]:
        weights = super().weights()
        if self.stage == HINT_STAGE:
            return {"hint": weights["hint"]}
        return weights

    def trainable_parameters(self, stage: Stage) -> Iterator[nn.Parameter]:
        if stage.name != HINT_STAGE:
            return self.parameters()
        feeding = parameters_feeding(self._student_tap, self.student_layers(), self.input_shape)
        return iter([*feeding, *self.regressors.parameters()])

    def method_terms(self, fw: Forward) -> dict[str, torch.Tensor]:
        losses = [hint_loss(regressor(fw.s_feats[s]), fw.t_feats[t])
                  for regressor, (s, t) in zip(self.regressors, self.pairs)]
        return {"hint": sum(losses)}
