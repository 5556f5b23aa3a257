"""Heo et al. 2019, "Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden Neurons"
(RepDistiller distiller_zoo/AB.py, models/util.py::Connector, helper/pretrain.py::init)."""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from kdrun.features import parameters_feeding
from kdrun.methods.base import Forward, Method, Stage
from kdrun.methods.fitnet import make_regressor
from kdrun.methods.common import config_number, head_modules, init_stage_lr, keep_head_in_eval, stage_pairs
from kdrun.methods.registry import register_method

INIT_STAGE = "init"
SCALE = 3 / 1000  # RepDistiller's constant factor on the per-sample hinge sum


def ab_loss(f_s: torch.Tensor, f_t: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Alternative-L2 hinge on the activation boundary, summed over elements, divided by N, times 3/1000:
    where the teacher is off (f_t <= 0) the student is pushed below -margin, where it is on (f_t > 0) above
    +margin; `f_s` is the student's pre-ReLU feature after the connector."""
    f_s, f_t = f_s.float(), f_t.float()
    off = (f_s + margin).pow(2) * ((f_s > -margin) & (f_t <= 0))
    on = (f_s - margin).pow(2) * ((f_s <= margin) & (f_t > 0))
    return (off + on).sum() / f_s.shape[0] * SCALE


def stage_weights(n: int) -> list[float]:
    """`2^(i - n + 1)`: the deepest pair weighs 1, each shallower one half the next."""
    return [2.0 ** (i - n + 1) for i in range(n)]


@register_method("ab")
class AB(Method):
    """Heo et al. 2019, Activation Boundaries: transfer the teacher's on/off neuron pattern in a first stage.

    As RepDistiller: pre-ReLU features, a conv-BN connector on the student where shapes differ, pair i of n
    weighted 2^(i-n+1); the init stage (`init_epochs`, the run's lr held constant as RepDistiller's init())
    trains the student's feature layers and the connectors on the AB loss alone (weight 1), then the main
    stage trains with the usual CE/KD weights and no AB term.

    Default `pairs: auto`: every stage's pre-ReLU feature, as RepDistiller's feat[1:-1] with preact=True
    (s1_pre..s3_pre for CIFAR ResNets, WRNs and ShuffleNets; s1_pre..s4_pre for VGG, MobileNetV2 and
    ResNet18/34/50); different stage counts are refused in one line naming both (RepDistiller's Connector
    asserts equal lengths): give `method.pairs`.

    The init stage follows RepDistiller's `model_s.eval(); init_modules.train()` with `get_feat_modules()`:
    only the stem and stages train there; the student's head (the modules that run after its last stage:
    WRN's final BN, MobileNetV2's and ShuffleNetV2's 1x1 head, the classifier) stays in eval mode with its
    parameters frozen, although WRN's s3_pre is that final BN's output (RepDistiller's preact f3 = bn1(f3))."""

    term_names = ("ab",)
    official_code = ("RepDistiller distiller_zoo/AB.py, helper/pretrain.py::init (get_feat_modules: the head, "
                     "e.g. WRN's final BN, frozen in eval mode); unequal stage counts refused")

    def __init__(self, cfg, student, teacher, num_classes):
        super().__init__(cfg, student, teacher, num_classes)
        self.pairs = stage_pairs(cfg, "ab", student, teacher, suffix="_pre")
        # at least one epoch: AB transfers only in its init stage
        self.init_epochs = config_number(cfg, "init_epochs", 30, minimum=1, integer=True)
        self.margin = config_number(cfg, "margin", 1.0)
        self.connectors = nn.ModuleList()
        self._head: tuple[nn.Module, ...] = ()       # the student's modules outside get_feat_modules()
        self._frozen: tuple[nn.Parameter, ...] = ()  # head parameters this method froze for the init stage

    def build(self, s_shapes, t_shapes) -> None:
        for s, t in self.pairs:
            s_shape, t_shape = s_shapes[s], t_shapes[t]
            if len(s_shape) == 3 and tuple(s_shape) == tuple(t_shape):
                self.connectors.append(nn.Identity())
            else:
                self.connectors.append(make_regressor("ab", (s, t), s_shape, t_shape, relu=False))
        self._head = tuple(head_modules(self.student, self.input_shape))

    def stages(self, epochs: int) -> list[Stage]:
        return [Stage(INIT_STAGE, self.init_epochs, lr=init_stage_lr(self.cfg), constant_lr=True), Stage("main", epochs)]

    def head_parameters(self) -> list[nn.Parameter]:
        return list(dict.fromkeys(p for m in self._head for p in m.parameters()))

    def begin_stage(self, stage: Stage) -> None:
        super().begin_stage(stage)
        if stage.name == INIT_STAGE and not self._frozen:
            self._frozen = tuple(p for p in self.head_parameters() if p.requires_grad)
            for p in self._frozen:
                p.requires_grad_(False)
        elif stage.name != INIT_STAGE:
            for p in self._frozen:
                p.requires_grad_(True)
            self._frozen = ()

    def train(self, mode: bool = True):
        super().train(mode)
        keep_head_in_eval(self, INIT_STAGE)
        return self

    def weights(self) -> dict[str, float]:
        if self.stage == INIT_STAGE:
            return {"ab": 1.0}
        weights = super().weights()
        weights.pop("ab")
        return weights

    def uses_teacher_outputs(self) -> bool:
        return self.stage == INIT_STAGE or self.step_weights().get("kd", 0.0) > 0

    def trainable_parameters(self, stage: Stage) -> Iterator[nn.Parameter]:
        if stage.name != INIT_STAGE:
            return self.student.parameters()  # the connectors only serve the init stage
        head = set(self.head_parameters())
        feeding = parameters_feeding(self._student_tap, self.student_layers(), self.input_shape)
        return iter([*(p for p in feeding if p not in head), *self.connectors.parameters()])

    def method_terms(self, fw: Forward) -> dict[str, torch.Tensor]:
        if self.stage != INIT_STAGE:
            return {}
        weights = stage_weights(len(self.pairs))
        losses = [w * ab_loss(connector(fw.s_feats[s]), fw.t_feats[t], self.margin)
                  for w, connector, (s, t) in zip(weights, self.connectors, self.pairs)]
        return {"ab": sum(losses)}
