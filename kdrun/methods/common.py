"""Helpers that several methods share: reading the method's numbers and pairs, default stage pairs, a
student's head, pooling, full precision."""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.errors import ConfigError
from kdrun.features import STAGE_ALIAS, layer_pairs, model_device, model_label, pair_error, resolve_layer

AUTO = "auto"  # `method.pairs=auto` (or null): the stages of both models, as RepDistiller's feat[1:-1]


def single_pair(cfg, method: str) -> tuple[str, str]:
    """The one `[student, teacher]` pair of `method.pairs`, for methods whose adapters serve a single pair."""
    pairs = layer_pairs(cfg.get("pairs"))
    if len(pairs) != 1:
        given = "[" + ",".join(f"[{s},{t}]" for s, t in pairs) + "]"
        raise ConfigError(f"method.pairs={given} is not allowed for {method}: it takes exactly one "
                          "[student, teacher] pair, e.g. [[pool,pool]]")
    return pairs[0]


def config_number(cfg, key: str, default: float, minimum: float = 0.0, strict: bool = False,
                  integer: bool = False) -> float | int:
    """`method.<key>` as a number >= minimum (> minimum when `strict`), refused otherwise with one line."""
    value = cfg.get(key, default)
    kind_ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    in_range = kind_ok and not isinstance(value, bool) and (value > minimum if strict else value >= minimum)
    if not in_range:
        kind = "an integer" if integer else "a number"
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise ConfigError(f"method.{key}={value} is not allowed: must be {kind} {bound}")
    return int(value) if integer else float(value)


def full_precision(device: torch.device):
    """Autocast off, for relation losses: their values are differences of batch similarities, which bf16
    (3 significant digits) drowns; e.g. CRD's exp(score / 0.07) is off by up to 6% from a bf16 score."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def pool_to_common_size(f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger of two feature maps down to the smaller one's H x W (RepDistiller's rule)."""
    size = (min(f_s.shape[2], f_t.shape[2]), min(f_s.shape[3], f_t.shape[3]))
    if tuple(f_s.shape[2:]) != size:
        f_s = F.adaptive_avg_pool2d(f_s, size)
    if tuple(f_t.shape[2:]) != size:
        f_t = F.adaptive_avg_pool2d(f_t, size)
    return f_s, f_t


def require_feature_maps(method: str, pair: tuple[str, str], s_shape, t_shape) -> None:
    """Refuse a pair unless both sides are C x H x W feature maps (not pooled vectors)."""
    if len(s_shape) != 3 or len(t_shape) != 3:
        raise pair_error(method, pair, s_shape, t_shape, "needs C x H x W feature maps on both sides")


def init_stage_lr(cfg) -> float | None:
    """`method.init_lr`: the constant learning rate of a preliminary stage, or None (null) for the run's own
    `optim.lr`, as RepDistiller's `init()` uses for AB and FSP; its stage has no schedule either way."""
    if cfg.get("init_lr") is None:
        return None
    return config_number(cfg, "init_lr", 0.0, strict=True)


# ----- default pairs from the models' stages ------------------------------------------------------------------
def stage_aliases(model: nn.Module) -> list[str]:
    """The model's stage aliases in order (`s1, s2, s3` for CIFAR ResNets, WRNs and ShuffleNets; `s1 .. s4` for
    VGG, MobileNetV2 and ResNet18/34/50): the maps of RepDistiller's `feat[1:-1]`."""
    stages = [a for a in getattr(model, "feature_aliases", {}) if STAGE_ALIAS.fullmatch(a)]
    return sorted(stages, key=lambda a: int(a[1:]))


def is_auto(value) -> bool:
    return value is None or (isinstance(value, str) and value == AUTO)


def stage_lists(method: str, student: nn.Module, teacher: nn.Module,
                example: Callable[[list[str], list[str]], str], align_last: bool = False) -> tuple[list[str], list[str]]:
    """The student's and the teacher's stage aliases, to be paired index by index. Refused in one line when
    the counts differ (naming both, with `example(s_stages, t_stages)` of all stages suggesting explicit pairs),
    unless `align_last`: then the last k of each, k the smaller count."""
    s_stages, t_stages = stage_aliases(student), stage_aliases(teacher)
    for model, stages in ((student, s_stages), (teacher, t_stages)):
        if not stages:
            raise ConfigError(f"method.pairs={AUTO} is not allowed for {method} with {model_label(model)}: it has "
                              "no stage aliases (s1, s2, ...); give method.pairs")
    k = min(len(s_stages), len(t_stages))
    if len(s_stages) != len(t_stages) and not align_last:
        raise ConfigError(f"method.pairs={AUTO} is not allowed for {method}: student {model_label(student)} has "
                          f"{len(s_stages)} stages and teacher {model_label(teacher)} has {len(t_stages)}, so they "
                          f"do not pair stage by stage; give method.pairs, e.g. "
                          f"'method.pairs={example(s_stages, t_stages)}'")
    return s_stages[-k:], t_stages[-k:]


def stage_pairs(cfg, method: str, student: nn.Module, teacher: nn.Module, suffix: str = "",
                align_last: bool = False) -> list[tuple[str, str]]:
    """`method.pairs`, where `auto` (or null) pairs stage i of the student with stage i of the teacher, every
    stage (`s1..sN`, or `s1_pre..sN_pre` with `suffix` "_pre"): RepDistiller's `feat[1:-1]`, three maps for the
    CIFAR ResNets, WRNs and ShuffleNets, four for VGG, MobileNetV2 and ResNet18/34/50."""
    value = cfg.get("pairs")
    if not is_auto(value):
        if isinstance(value, str):
            raise ConfigError(f"method.pairs={value} is not allowed: {AUTO}, or a non-empty list of [student, "
                              "teacher] layer names, e.g. [[s2,s2],[s3,s3]]")
        return layer_pairs(value)

    def example(s_stages, t_stages):  # the last k stages of each
        k = min(len(s_stages), len(t_stages))
        return "[" + ",".join(f"[{s}{suffix},{t}{suffix}]" for s, t in zip(s_stages[-k:], t_stages[-k:])) + "]"

    s_stages, t_stages = stage_lists(method, student, teacher, example, align_last)
    return [(s + suffix, t + suffix) for s, t in zip(s_stages, t_stages)]


# ----- a student's head: what RepDistiller's get_feat_modules() leaves out -------------------------------------
@torch.no_grad()
def head_modules(model: nn.Module, input_shape: Sequence[int]) -> list[nn.Module]:
    """The modules of `model` that first run after its deepest stage output (`sN`): WRN's final BN, MobileNetV2's
    and ShuffleNetV2's 1x1 head conv, the classifier. The others are RepDistiller's `get_feat_modules()` (stem
    and stages) for every family; found by the order modules start in one dummy forward. A model without stage
    aliases has no known head: []."""
    stages = stage_aliases(model)
    if not stages:
        return []
    last, take_input = resolve_layer(model, stages[-1])
    started: list[nn.Module] = []
    cut: list[int] = []

    def on_start(module, _args):
        started.append(module)

    def on_cut(*_):
        cut.append(len(started))

    handles = [m.register_forward_pre_hook(on_start) for m in model.modules()]
    handles.append(last.register_forward_pre_hook(on_cut, prepend=True) if take_input
                   else last.register_forward_hook(on_cut))
    was_training = model.training
    try:
        model.eval()(torch.zeros(2, *input_shape, device=model_device(model)))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    first: dict[nn.Module, int] = {}
    for i, module in enumerate(started):
        first.setdefault(module, i)
    return [m for m, i in first.items() if i >= cut[0]]


def keep_head_in_eval(method, init_stage: str) -> None:
    """During a preliminary stage (AB's and FSP's init), the head stays in eval mode, as RepDistiller's
    `init()` trains only `get_feat_modules()`; call after `nn.Module.train`."""
    if method.training and method.stage == init_stage:
        for module in method._head:
            module.eval()
