"""IFM's auxiliary network: which model it is and how it is made wider than the student.

The official pipeline (passalis/pkth) pairs the student `Cifar_Very_Tiny` (conv 8/16/32, fc 64) with the
auxiliary network `Cifar_Tiny` (conv 16/32/64, fc 128): the student's architecture with every width
doubled. Here `aux_model` names the architecture (`auto`: the student's own) and `aux_width` multiplies its
channels (default 2, as the official pair). The student's model options (e.g. `residual`) follow it where
they apply, and `aux_options` has the last word.

Widening is supported where the channels are a parameter of the family: the CIFAR ResNets (every width,
the stem's included, as the official pair), the WRNs (the widen factor; the family keeps its 16-channel
stem) and models with a `width_mult` option (`mobilenetv2`, and `mobilenetv2_half` through it). For any
other model, name an already wider one with `aux_width=1`.
"""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdrun.errors import ConfigError
from kdrun.models import MODELS, create_model, model_options
from kdrun.models.cifar_resnet import CifarResNet
from kdrun.models.wrn import WideResNet

HALF_SUFFIX = "_half"  # `<model>_half` is `<model>` at width_mult 0.5 (RepDistiller's mobile_half)


def auxiliary_model(method_cfg, student_cfg) -> tuple[str, dict]:
    """The auxiliary network's model name and options, before widening: `aux_model` (the student's model
    for `auto`), with the student's options where the model takes them, overridden by `aux_options`."""
    student = OmegaConf.to_container(student_cfg, resolve=True)
    student_options = {k: v for k, v in student.items() if k in model_options(student["name"])}
    given = method_cfg.get("aux_options") or {}
    if not isinstance(given, DictConfig | dict):
        raise ConfigError(f"method.aux_options={given} is not allowed: give a mapping of model options")
    given = OmegaConf.to_container(given, resolve=True) if isinstance(given, DictConfig) else dict(given)
    name = method_cfg.get("aux_model") or "auto"
    if name == "auto":
        name = student["name"]
    elif name not in MODELS:
        raise ConfigError(MODELS.unknown_message(name, key="method.aux_model"))
    inherited = {k: v for k, v in student_options.items() if k in model_options(name)}
    return name, {**inherited, **given}


def width_mult_form(name: str, options: dict) -> tuple[str, dict] | None:
    """(model, options) that express `name` through a `width_mult` option, or None if it has none."""
    if "width_mult" in model_options(name):
        return name, {"width_mult": float(model_options(name)["width_mult"]), **options}
    base = name.removesuffix(HALF_SUFFIX)
    if name.endswith(HALF_SUFFIX) and base in MODELS and "width_mult" in model_options(base):
        return base, {**options, "width_mult": 0.5}
    return None


def scaled(width: int, factor: float) -> int:
    return max(1, round(width * factor))


def widened(model: nn.Module, factor: float, num_classes: int, in_channels: int) -> nn.Module | None:
    """The same architecture as `model` with its channels times `factor`, freshly initialised; None when
    the family has no width parameter this knows."""
    if isinstance(model, CifarResNet):
        stages = (model.layer1, model.layer2, model.layer3)
        widths = (model.stem[0].out_channels, *(stage[-1].conv2.out_channels for stage in stages))
        return CifarResNet(6 * len(model.layer1) + 2, tuple(scaled(w, factor) for w in widths), num_classes,
                           in_channels, model.layer1[0].residual)
    if isinstance(model, WideResNet):
        widen = model.layer1[-1].conv2.out_channels / 16 * factor
        if widen != int(widen):
            raise ConfigError(f"method.aux_width={factor:g} is not allowed for a WRN of widen factor "
                              f"{model.layer1[-1].conv2.out_channels // 16}: the widen factor must stay an integer")
        return WideResNet(6 * len(model.layer1) + 4, int(widen), num_classes, in_channels)
    return None


def build_auxiliary(name: str, options: dict, factor: float, num_classes: int, in_channels: int) -> nn.Module:
    """The auxiliary network: model `name` with `options`, its channels times `factor` (`aux_width`)."""
    if factor == 1:
        return create_model(name, num_classes, in_channels, **options)
    mult = width_mult_form(name, options)
    if mult is not None:
        base, mult_options = mult
        model = create_model(base, num_classes, in_channels,
                             **{**mult_options, "width_mult": mult_options["width_mult"] * factor})
    else:
        model = widened(create_model(name, num_classes, in_channels, **options), factor, num_classes, in_channels)
        if model is None:
            raise ConfigError(f"method.aux_width={factor:g} is not allowed for method.aux_model={name}: its "
                              "channels are no parameter kdrun knows (CIFAR ResNets, WRNs and width_mult models "
                              "are); name a wider model with method.aux_width=1, e.g. method.aux_model=resnet8x4")
    model.model_name = f"{name} x{factor:g} width"
    return model
