"""Zhou et al. AAAI 2018, "Rocket Launching: A Universal and Efficient Framework for Training Well-performing
Light Net": a light net and a booster net share their lower convolutions and train together from scratch."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.errors import ConfigError
from kdrun.features import model_label
from kdrun.methods.base import Method, StepOutput
from kdrun.methods.common import config_number
from kdrun.methods.registry import register_method
from kdrun.models import MODELS, create_model
from kdrun.models.cifar_resnet import CifarResNet
from kdrun.models.wrn import WideResNet

SHARING = ("interval", "none")
INTERVAL_FAMILIES = (CifarResNet, WideResNet)
STAGES = ("layer1", "layer2", "layer3")
INTERVAL_PAIRS = ("CIFAR ResNets of the same widths (resnet8 ... resnet110 with each other, resnet8x4 with "
                  "resnet32x4) or WRNs of the same width (wrn_16_1 with wrn_40_1, wrn_16_2 with wrn_40_2), the "
                  "booster at least as deep")


def rocket_loss(z_light: torch.Tensor, z_booster: torch.Tensor) -> torch.Tensor:
    """The hint term `sum_{n,k} (z_booster - z_light)^2 / N`: summed over the K classes, divided by the batch
    (`rocket_interval.py`: `((y_course - ys) * (y_course - ys)).sum() / opt.batchSize`), so K times the mean
    over N x K. The booster's logits are detached (the paper's gradient block: the hint pulls the light net
    toward the booster, never the reverse)."""
    diff = z_light.float() - z_booster.detach().float()
    return diff.pow(2).sum() / z_light.shape[0]


def shared_units(light: nn.Module) -> list[str]:
    """The light net's modules whose convolutions the booster shares: the stem and every block of every stage
    (the light net's block i of a stage shares with the booster's block i of that stage)."""
    return ["stem"] + [f"{stage}.{i}" for stage in STAGES for i in range(len(light.get_submodule(stage)))]


def convs_of(module: nn.Module) -> dict[str, nn.Conv2d]:
    return {name: m for name, m in module.named_modules() if isinstance(m, nn.Conv2d)}


def describe(path: str, convs: dict[str, nn.Conv2d]) -> str:
    return ", ".join(f"{path}.{name}".rstrip(".") + f" {tuple(conv.weight.shape)}" for name, conv in convs.items())


def interval_refusal(booster: nn.Module, light: nn.Module, reason: str) -> ConfigError:
    return ConfigError(f"method.booster={model_label(booster)} is not allowed with student={model_label(light)} "
                       f"and method.shared=interval: {reason}; the light net's blocks share their conv weights "
                       f"with the booster's first blocks of each stage, so pair {INTERVAL_PAIRS}, or set "
                       "method.shared=none")


def interval_pairs(booster: nn.Module, light: nn.Module) -> list[tuple[nn.Conv2d, nn.Conv2d]]:
    """(light conv, booster conv) pairs of `rocket_interval.py`'s sharing: the stem conv, and every conv of the
    light net's blocks with the one at the same place in the booster's first blocks of the same stage.
    Refuses, in one line, pairs of models where that sharing cannot be done."""
    if not isinstance(light, INTERVAL_FAMILIES) or type(booster) is not type(light):
        raise interval_refusal(booster, light, "only two CIFAR ResNets or two WRNs can share stage by stage")
    pairs = []
    for path in shared_units(light):
        stage, _, index = path.partition(".")
        if index and int(index) >= len(booster.get_submodule(stage)):
            raise interval_refusal(booster, light, f"the booster's {stage} is shallower than the light net's "
                                   f"({len(booster.get_submodule(stage))} vs {len(light.get_submodule(stage))} blocks)")
        light_convs, booster_convs = convs_of(light.get_submodule(path)), convs_of(booster.get_submodule(path))
        same = light_convs.keys() == booster_convs.keys() and all(
            conv.weight.shape == booster_convs[name].weight.shape for name, conv in light_convs.items())
        if not same:
            raise interval_refusal(booster, light, f"their {path} convolutions differ ("
                                   f"{describe(path, light_convs)} vs {describe(path, booster_convs)})")
        pairs += [(conv, booster_convs[name]) for name, conv in light_convs.items()]
    return pairs


def share_interval(booster: nn.Module, light: nn.Module) -> list[nn.Parameter]:
    """Make the booster's shared convolutions use the light net's weight tensors (in place): the very same
    Parameter objects, so both nets' losses update one tensor, and one optimizer sees it once. BN layers,
    the booster's deeper blocks, WRN's final BN and the classifiers stay separate. Returns the shared
    parameters."""
    shared = []
    for light_conv, booster_conv in interval_pairs(booster, light):
        for name in ("weight", "bias"):
            param = getattr(light_conv, name)
            if param is not None:
                setattr(booster_conv, name, param)
                shared.append(param)
    return shared


@register_method("rocket")
class RocketLaunching(Method):
    """Zhou et al. AAAI 2018, Rocket Launching: light net + booster sharing lower convolutions, logit hint.

    The booster (`method.booster`, default the run's teacher model) trains from scratch with the light net
    (the run's student): `CE_light + CE_booster + lambda * sum_k (z_booster - z_light)_k^2 / N`, where the
    hint's gradient never reaches the booster (its logits are detached); through the light net's own
    forward it does reach the shared convolutions, as in the official code. `method.shared=interval`
    (`rocket_interval.py`): the stem conv and the convs of the light net's n_s blocks of each stage are the
    booster's first n_s blocks' convs of that stage (same tensors); every BN layer and the classifiers stay
    separate, and each net runs its own forward. `none` shares nothing (the paper's ablation). Both nets are
    evaluated every epoch (light first: it is the run's model). One optimizer holds both nets; SGD state is
    per parameter and a shared tensor appears once, which is the official single optimizer.
    """

    needs_teacher = False
    supervised_terms = ("ce", "ce_booster")  # past kd_until_epoch both nets keep learning their labels
    official_code = ("zhougr1993/Rocket-Launching rocket_interval.py (hint summed over classes / N, booster "
                     "detached; stem conv and first blocks' convs shared, BN separate); differences: divides by "
                     "the actual batch, not the fixed --batchSize; kdrun ResNets' stem and shortcut BNs are "
                     "separate too; rocket_bottom.py's sharing is not offered")
    uses_labels = True  # a transfer set without labels refuses it

    @classmethod
    def configure(cls, cfg) -> None:
        booster = cfg.method.get("booster")
        if booster not in MODELS:
            raise ConfigError(MODELS.unknown_message(booster, "method.booster"))
        shared = cfg.method.get("shared")
        if shared not in SHARING:
            raise ConfigError(f"method.shared={shared} is not allowed: one of {', '.join(SHARING)}")
        config_number(cfg.method, "lambda", 0.03)

    def __init__(self, cfg, student: nn.Module, teacher: nn.Module | None, num_classes: int):
        super().__init__(cfg, student, teacher, num_classes)
        self.shared = str(cfg.shared)
        self.booster: nn.Module | None = None  # built in `build`, once the input shape is known

    def build(self, s_shapes, t_shapes) -> None:
        device = next(self.student.parameters()).device
        booster = create_model(str(self.cfg.booster), self.num_classes, self.input_shape[0]).to(device)
        if self.shared == "interval":
            share_interval(booster, self.student)
        self.booster = booster

    def weights(self) -> dict[str, float]:
        return {"ce": self.ce_weight(), "ce_booster": 1.0, "hint": float(self.cfg["lambda"])}

    def eval_models(self) -> dict[str, nn.Module]:
        return {"light": self.student, "booster": self.booster}

    def forward(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> StepOutput:
        z_light, z_booster = self.student(images), self.booster(images)
        terms = {"ce": F.cross_entropy(z_light.float(), labels),
                 "ce_booster": F.cross_entropy(z_booster.float(), labels),
                 "hint": rocket_loss(z_light, z_booster)}
        return StepOutput(terms, z_light)
