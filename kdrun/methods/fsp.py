"""Yim, Joo, Bae & Kim 2017, "A Gift from Knowledge Distillation: Fast Optimization, Network Minimization
and Transfer Learning" (RepDistiller distiller_zoo/FSP.py, helper/pretrain.py)."""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from omegaconf import ListConfig
from torch import nn

from kdrun.errors import ConfigError
from kdrun.features import format_shape, model_label
from kdrun.methods.base import Forward, Method, Stage
from kdrun.methods.registry import register_method
from kdrun.methods.common import (config_number, head_modules, init_stage_lr, is_auto, keep_head_in_eval,
                                  stage_lists)

INIT_STAGE = "fsp"

Layers = tuple[str, str]  # (first, second) layer of one FSP matrix


def fsp_matrix(f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
    """G[n, i, j] = sum_{h,w} f1[n, i, h, w] f2[n, j, h, w] / (h w), an (N x C1 x C2) "flow" between two maps.

    The larger map is average-pooled to the smaller one's size first (normally f1, the earlier layer)."""
    if f1.shape[2:] != f2.shape[2:]:
        size = (min(f1.shape[2], f2.shape[2]), min(f1.shape[3], f2.shape[3]))
        f1, f2 = F.adaptive_avg_pool2d(f1, size), F.adaptive_avg_pool2d(f2, size)
    return torch.einsum("nihw,njhw->nij", f1, f2) / (f1.shape[2] * f1.shape[3])


def fsp_loss(g_s: torch.Tensor, g_t: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of two FSP matrices (over batch and both channel axes), as RepDistiller."""
    return ((g_s - g_t.detach()) ** 2).mean()


def _layer_couple(entry) -> Layers | None:
    if isinstance(entry, (list, tuple, ListConfig)) and len(entry) == 2 \
            and all(isinstance(name, str) and name for name in entry):
        return str(entry[0]), str(entry[1])
    return None


def stage_flows(student: nn.Module, teacher: nn.Module) -> list[tuple[Layers, Layers]]:
    """`pairs: auto`: each stage's input and output, stem->s1, s1->s2, ..., s(N-1)->sN on both nets, as
    RepDistiller's FSP over feat[:-1] (3 matrices for CIFAR ResNets, WRNs and ShuffleNets, 4 for VGG,
    MobileNetV2 and ResNet18/34/50); different stage counts are refused, as RepDistiller's assert."""

    def flows(stages):
        return list(zip(["stem", *stages[:-1]], stages))

    def example(s_stages, t_stages):  # the last k flows of each
        k = min(len(s_stages), len(t_stages))
        entries = [f"[[{a},{b}],[{c},{d}]]" for (a, b), (c, d) in zip(flows(s_stages)[-k:], flows(t_stages)[-k:])]
        return "[" + ",".join(entries) + "]"

    s_stages, t_stages = stage_lists("fsp", student, teacher, example)
    return list(zip(flows(s_stages), flows(t_stages)))


def fsp_pairs(cfg, student: nn.Module, teacher: nn.Module) -> list[tuple[Layers, Layers]]:
    """`method.pairs` as [((student_first, student_second), (teacher_first, teacher_second)), ...].

    `auto` (or null) is `stage_flows` of the two models. An entry `[s1, s2]` takes the matrix between s1 and s2
    on both nets; `[[s1, s2], [s2, s3]]` names the student's layers first, then the teacher's."""
    value = cfg.get("pairs")
    if is_auto(value):
        return stage_flows(student, teacher)
    entries = value if isinstance(value, (list, tuple, ListConfig)) and value else [None]
    pairs = []
    for entry in entries:
        same = _layer_couple(entry)
        if same:
            pairs.append((same, same))
            continue
        if isinstance(entry, (list, tuple, ListConfig)) and len(entry) == 2:
            s, t = _layer_couple(entry[0]), _layer_couple(entry[1])
            if s and t:
                pairs.append((s, t))
                continue
        raise ConfigError(f"method.pairs={value} is not allowed: give auto, or a non-empty list of [first, second] "
                          "layers (the same on both nets) or [[student_first, student_second], [teacher_first, "
                          "teacher_second]], e.g. method.pairs=[[stem,s1],[s1,s2],[s2,s3]]")
    return pairs


def _matrix_text(model: nn.Module, layers: Layers, shapes) -> str:
    first, second = layers
    return (f"{model_label(model)} {first}->{second} is {shapes[first][0]}x{shapes[second][0]} "
            f"({first} {format_shape(shapes[first])}, {second} {format_shape(shapes[second])})")


@register_method("fsp")
class FSP(Method):
    """Yim et al. 2017, A Gift from Knowledge Distillation: first fit the teacher's FSP matrices (flow between layers).

    Two stages, as RepDistiller: stage `fsp` trains the student on the FSP term alone for `init_epochs`
    (the classifier gets no gradient there), then stage `main` is ordinary training (CE, plus KD when
    `alpha` > 0) with no FSP term. Keys: `pairs` (see `fsp_pairs`; default `auto`: each stage's input and
    output, stem->s1, ..., s(N-1)->sN, as RepDistiller's feat[:-1]; different stage counts are refused in one
    line naming both), `init_epochs` (30). The term `fsp` is the sum over pairs of `fsp_loss`,
    weighted by `beta` (1: RepDistiller sums its init-stage terms unweighted; its `-b 50` flag, the 50 often
    quoted for FSP, never reaches them). FSP compares matrices entry by entry, so each
    pair's channel counts must be equal on both nets; other pairs are refused.

    As RepDistiller's init() with `get_feat_modules()`, the fsp stage trains the stem and stages only; the
    student's head (modules run after its last stage: WRN's final BN, a 1x1 head conv, the classifier) is
    left out of the optimizer and kept in eval mode.
    """

    official_code = ("RepDistiller distiller_zoo/FSP.py over feat[:-1], helper/pretrain.py::init "
                     "(get_feat_modules: the head in eval mode); beta 1, as -b never reaches init()")

    def __init__(self, cfg, student, teacher, num_classes):
        super().__init__(cfg, student, teacher, num_classes)
        self.pairs = fsp_pairs(cfg, student, teacher)
        self.init_epochs = config_number(cfg, "init_epochs", 30, integer=True)
        self._head: tuple[nn.Module, ...] = ()  # the student's modules outside get_feat_modules()

    def student_layers(self) -> list[str]:
        return list(dict.fromkeys(name for s, _ in self.pairs for name in s))

    def teacher_layers(self) -> list[str]:
        return list(dict.fromkeys(name for _, t in self.pairs for name in t))

    def build(self, s_shapes, t_shapes) -> None:
        for s, t in self.pairs:
            for name, shapes, model in ((s[0], s_shapes, self.student), (s[1], s_shapes, self.student),
                                        (t[0], t_shapes, self.teacher), (t[1], t_shapes, self.teacher)):
                if len(shapes[name]) != 3:
                    raise ConfigError(f"method.pairs: fsp needs C x H x W feature maps, but {name} of "
                                      f"{model_label(model)} is {format_shape(shapes[name])}")
            if (s_shapes[s[0]][0], s_shapes[s[1]][0]) != (t_shapes[t[0]][0], t_shapes[t[1]][0]):
                raise ConfigError(f"method.pairs: FSP matrices cannot be compared: student "
                                  f"{_matrix_text(self.student, s, s_shapes)} but teacher "
                                  f"{_matrix_text(self.teacher, t, t_shapes)}; pair layers of equal channel counts")
        self._head = tuple(head_modules(self.student, self.input_shape))

    def stages(self, epochs: int) -> list[Stage]:
        init = [Stage(INIT_STAGE, self.init_epochs, lr=init_stage_lr(self.cfg), constant_lr=True)] if self.init_epochs > 0 else []
        return init + [Stage("main", epochs)]

    def weights(self) -> dict[str, float]:
        # the init stage has the FSP term alone: without a `ce` or `kd` weight the base adds neither
        if self.stage == INIT_STAGE:
            return {"fsp": float(self.cfg.get("beta", 1.0))}
        return super().weights()

    def uses_teacher_outputs(self) -> bool:
        # the main stage needs the teacher only for KD
        return self.stage == INIT_STAGE or self.step_weights().get("kd", 0.0) > 0

    def trainable_parameters(self, stage: Stage) -> Iterator[nn.Parameter]:
        if stage.name != INIT_STAGE:
            return self.student.parameters()
        head = {p for m in self._head for p in m.parameters()}
        return iter([p for p in self.student.parameters() if p not in head])

    def train(self, mode: bool = True):
        super().train(mode)
        keep_head_in_eval(self, INIT_STAGE)
        return self

    def method_terms(self, fw: Forward) -> dict[str, torch.Tensor]:
        if self.stage != INIT_STAGE:
            return {}
        losses = [fsp_loss(fsp_matrix(fw.s_feats[s[0]], fw.s_feats[s[1]]),
                           fsp_matrix(fw.t_feats[t[0]], fw.t_feats[t[1]])) for s, t in self.pairs]
        return {"fsp": torch.stack(losses).sum()}
