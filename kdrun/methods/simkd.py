"""Chen, Mei, Wang, Feng & Chen 2022, "Knowledge Distillation with the Reused Teacher Classifier" (DefangChen/SimKD
models/util.py::SimKD, helper/loops.py, train_student.py, scripts/run_distill.sh).

A projector maps the student's last feature map onto the teacher's; the only loss is the MSE between the two,
and the student predicts with the teacher's frozen classifier on the pooled projection. What is deployed is
therefore the student, the projector and the teacher's head together (`SimKDStudent`), which `eval_models()`
evaluates and reports. The official code applies the teacher's `get_feat_modules()[-1]` (the final Linear of
its CIFAR ResNets and VGGs) after an average pooling; here the head is every teacher module that runs after the
tapped last stage, which for those families is exactly pooling + Linear, and for families the official code has
no classifier module for (WRN's final BN + ReLU, MobileNetV2's 1x1 head conv) the rest of the teacher's forward.

As in helper/loops.py, the optional `ce` and `kd` terms (weights `ce_weight`, `alpha`: both 0 in the official
CIFAR-100 script) read the plain student's own classifier; `response_logits: deployed` puts them on the deployed
logits instead. Training accuracy is that of the deployed logits, as the official metrics are.
"""
from __future__ import annotations

import copy
from typing import ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.errors import ConfigError
from kdrun.features import FeatureTap, is_fx, layer_pairs, model_label, resolve_layer
from kdrun.methods.base import Forward, Method, Stage, StepOutput
from kdrun.methods.common import config_number, head_modules, is_auto, require_feature_maps
from kdrun.methods.registry import register_method

RESPONSE_LOGITS = ("student", "deployed")
DEFAULT_PAIR = ("last", "last")


def align_spatial(f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SimKD.forward's spatial alignment: when the student's map is taller it is average-pooled to the teacher's
    size, else the teacher's is pooled to the student's (a no-op at equal sizes). Returns (source, target). The
    official code compares heights and pools to h x h; here to h x w, the same on the square maps of every model."""
    if f_s.shape[2] > f_t.shape[2]:
        return F.adaptive_avg_pool2d(f_s, f_t.shape[2:]), f_t
    return f_s, F.adaptive_avg_pool2d(f_t, f_s.shape[2:])


def simkd_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`nn.MSELoss()(P(source), target)`: the mean over every element; the teacher's side is a constant."""
    return F.mse_loss(projected.float(), target.detach().float())


class SimKDProjector(nn.Sequential):
    """SimKD's `transfer` bottleneck, layer for layer (same indices, so state_dicts match the official module's):
    1x1 conv -> BN -> ReLU -> 3x3 conv -> BN -> ReLU -> 1x1 conv -> BN -> ReLU, from the student's channels to
    the teacher's through `teacher_channels // factor`; bias-free convs, a dense (not depthwise) 3x3 conv."""

    def __init__(self, student_channels: int, teacher_channels: int, factor: int = 2):
        mid = teacher_channels // factor
        super().__init__(
            nn.Conv2d(student_channels, mid, kernel_size=1, padding=0, stride=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, kernel_size=3, padding=1, stride=1, bias=False, groups=1),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, teacher_channels, kernel_size=1, padding=0, stride=1, bias=False),
            nn.BatchNorm2d(teacher_channels),
            nn.ReLU(inplace=True),
        )


class SimKDStudent(nn.Module):
    """The deployed SimKD student: `head(projector(pool?(student's feature)))`. The head is a frozen copy of the
    teacher's modules after its last stage and stays in eval mode (its BN statistics, if any, are the teacher's).
    Submodules are registered student, projector, head: the last Linear over the classes is the head's."""

    def __init__(self, student: nn.Module, layer: str, projector: SimKDProjector, head: nn.Sequential,
                 source_size: tuple[int, int] | None):
        super().__init__()
        self.student = student
        self.projector = projector
        self.head = head.requires_grad_(False).eval()
        self.layer = layer
        self.source_size = source_size  # the teacher's H x W the student's taller map is pooled to, if it is taller
        self.model_name = f"simkd({model_label(student)})"
        self.tap = FeatureTap(student, [layer])

    def project(self, f_s: torch.Tensor) -> torch.Tensor:
        if self.source_size is not None:
            f_s = F.adaptive_avg_pool2d(f_s, self.source_size)
        return self.projector(f_s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, feats = self.tap(x)
        return self.head(self.project(feats[self.layer]))

    def train(self, mode: bool = True):
        super().train(mode)
        self.head.eval()
        return self


def top_level(model: nn.Module, modules: list[nn.Module]) -> list[nn.Module]:
    """Those of `modules` (in order) that are not inside another of them."""
    names = {id(m): name for name, m in model.named_modules()}
    chosen = {names[id(m)] for m in modules}
    return [m for m in modules
            if not any(".".join(names[id(m)].split(".")[:i]) in chosen for i in range(1, names[id(m)].count(".") + 1))]


@register_method("simkd")
class SimKD(Method):
    """Chen et al. 2022, Knowledge Distillation with the Reused Teacher Classifier: a projector + the teacher's head.

    Keys: `pairs` (one [student, teacher] pair of C x H x W maps; the teacher's side its last stage, whose head the
    student reuses), `factor` (projector bottleneck), `response_logits` (which logits `ce`/`kd` read). The term
    `simkd` (`simkd_loss`) has weight `beta`. `record_extras()` counts the deployed student's parameters."""

    official_code = ("DefangChen/SimKD models/util.py::SimKD + helper/loops.py (the reused head: every teacher module "
                     "after its last stage, e.g. WRN's final BN+ReLU)")
    term_names: ClassVar[tuple[str, ...]] = ("simkd",)

    @classmethod
    def configure(cls, cfg) -> None:
        """Options that would compress, cache or score only the plain student, not the deployed one."""
        from kdrun.compress.options import refusal

        why = ("method=simkd deploys the student with a projector and the teacher's head, and only the plain "
               "student would be {}")
        student = cfg.get("student") or {}
        if student.get("quantize") is not None:
            raise refusal("quantize", student.get("quantize"), why.format("quantized"), "student.quantize=null")
        if student.get("prune") is not None:
            raise refusal("prune", student.get("prune"), why.format("pruned and measured"), "student.prune=null")
        assistants = list(cfg.get("assistants") or [])
        if assistants:
            raise ConfigError(f"assistants=[{','.join(map(str, assistants))}] is not allowed with method=simkd: an "
                              "assistant is cached and taught from as its plain network, whose own classifier "
                              "simkd does not train; give assistants=[]")
        transfer = cfg.get("transfer") or {}
        if transfer.get("competition") is True:
            raise ConfigError("transfer.competition=true is not allowed with method=simkd: its rounds compete "
                              "against the plain student's own classifier, which simkd does not train; give "
                              "transfer.competition=false")

    def __init__(self, cfg, student, teacher, num_classes):
        super().__init__(cfg, student, teacher, num_classes)
        self.factor = config_number(cfg, "factor", 2, minimum=1, integer=True)
        self.response_logits = cfg.get("response_logits", "student")
        if self.response_logits not in RESPONSE_LOGITS:
            raise ConfigError(f"method.response_logits={self.response_logits} is not allowed: one of "
                              f"{', '.join(RESPONSE_LOGITS)}")
        if self.kd_until_epoch is not None and self.response_logits == "student":
            raise ConfigError(f"method.kd_until_epoch={self.kd_until_epoch} is not allowed with "
                              "method.response_logits=student: afterwards only CE on the plain student's own "
                              "classifier would train, which the deployed student does not use; give "
                              "method.response_logits=deployed")
        value = cfg.get("pairs")
        pairs = [DEFAULT_PAIR] if is_auto(value) else layer_pairs(value)
        if len(pairs) != 1:
            given = "[" + ",".join(f"[{s},{t}]" for s, t in pairs) + "]"
            raise ConfigError(f"method.pairs={given} is not allowed for simkd: it takes exactly one [student, "
                              "teacher] pair, e.g. [[last,last]]")
        self.pairs = pairs
        self.deployed: SimKDStudent | None = None
        self._teacher_head: tuple[nn.Sequential, ...] = ()  # the teacher's own modules, hidden from the tree

    # ----- building the deployed student ---------------------------------------------------------------
    def build(self, s_shapes, t_shapes) -> None:
        (s_layer, t_layer), = self.pairs
        s_shape, t_shape = s_shapes[s_layer], t_shapes[t_layer]
        require_feature_maps("simkd", self.pairs[0], s_shape, t_shape)
        self.check_teacher_layer(t_layer)
        if t_shape[0] // self.factor < 1:
            raise ConfigError(f"method.factor={self.factor} is not allowed: the teacher's {t_layer} has {t_shape[0]} "
                              "channels, and the projector's inner width is channels // factor")
        originals = nn.Sequential(*top_level(self.teacher, head_modules(self.teacher, self.input_shape)))
        self._teacher_head = (originals,)
        head = copy.deepcopy(originals)
        for module in head.modules():  # the projected map also feeds the loss: nothing in the head may overwrite it
            if getattr(module, "inplace", False) is True:
                module.inplace = False
        source_size = tuple(t_shape[1:]) if s_shape[1] > t_shape[1] else None
        self.deployed = SimKDStudent(self.student, s_layer, SimKDProjector(s_shape[0], t_shape[0], self.factor),
                                     head, source_size)
        self.check_head(t_layer)

    def check_teacher_layer(self, t_layer: str) -> None:
        if not is_fx(t_layer) and resolve_layer(self.teacher, t_layer) == resolve_layer(self.teacher, "last"):
            return
        raise ConfigError(f"method.pairs=[{self.pairs[0][0]},{t_layer}] is not allowed for simkd: the teacher's side "
                          f"must be its last stage (last), whose following modules are the classifier the student "
                          f"reuses")

    @torch.no_grad()
    def check_head(self, t_layer: str) -> None:
        """The copied head must turn the teacher's own feature into the teacher's logits."""
        tap = FeatureTap(self.teacher, [t_layer])
        was_training = self.teacher.training
        self.teacher.eval()
        try:
            x = torch.randn(2, *self.input_shape, generator=torch.Generator().manual_seed(0))
            logits, feats = tap(x.to(next(self.teacher.parameters()).device))
            self.deployed.head.to(logits.device)
            rebuilt = self.deployed.head(feats[t_layer])
        finally:
            tap.remove()
            self.teacher.train(was_training)
        scale = logits.abs().max().item()
        if rebuilt.shape != logits.shape or not torch.allclose(rebuilt, logits, rtol=1e-4, atol=1e-4 * scale + 1e-6):
            raise ConfigError(f"teacher={model_label(self.teacher)} is not allowed with method=simkd: its modules "
                              f"after {t_layer} do not run as one sequence to its logits, so its classifier cannot "
                              "be reused on their own")

    def begin_stage(self, stage: Stage) -> None:
        """The teacher may have been trained or loaded after `build`: its head's weights are taken again."""
        super().begin_stage(stage)
        self.deployed.head.load_state_dict(self._teacher_head[0].state_dict())

    # ----- training ------------------------------------------------------------------------------------
    def trainable_parameters(self, stage: Stage) -> Iterator[nn.Parameter]:
        return iter([p for p in self.parameters() if p.requires_grad])  # not the teacher's head

    def eval_models(self) -> dict[str, nn.Module]:
        return {"student": self.deployed}

    def forward(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> StepOutput:
        (s_layer, t_layer), = self.pairs
        t_logits, t_feats = self.run_teacher(images, index)
        s_logits, s_feats = self._student_tap(images)
        projected = self.deployed.project(s_feats[s_layer])
        logits = self.deployed.head(projected)
        response = logits if self.response_logits == "deployed" else s_logits
        terms = self.response_terms(Forward(response, t_logits, s_feats, t_feats, labels, index))
        if self.distilling():
            _, target = align_spatial(s_feats[s_layer], t_feats[t_layer])
            terms["simkd"] = simkd_loss(projected, target)
        return StepOutput(terms, logits)

    def record_extras(self) -> dict:
        def count(module: nn.Module) -> int:
            return sum(p.numel() for p in module.parameters())

        return {"deployed_params": count(self.deployed), "student_params": count(self.student),
                "projector_params": count(self.deployed.projector), "teacher_head_params": count(self.deployed.head)}
