"""Heo, Kim, Yun, Park, Kwak & Choi 2019, "A Comprehensive Overhaul of Feature Distillation"
(mdistiller mdistiller/distillers/OFD.py; clovaai/overhaul-distillation)."""
from __future__ import annotations

import math
from collections import deque

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.features import FeatureTap, model_device, model_label, pair_error
from kdrun.methods.base import Forward, Method
from kdrun.methods.common import require_feature_maps, stage_pairs
from kdrun.methods.registry import register_method

# Below this probability of a negative response the conditional mean is numerically meaningless; the
# official code then uses -3 sigma.
NEGATIVE_MASS_FLOOR = 1e-3

# Autograd nodes a BatchNorm's output may pass through and still be "the" pre-ReLU feature: residual sums,
# concatenations and reshapes (channel shuffles), but no conv, norm or nonlinearity.
PASS_THROUGH_OPS = {"Add", "Cat", "View", "UnsafeView", "Reshape", "ReshapeAlias", "Permute", "Transpose",
                    "Clone", "Slice", "Split", "SplitWithSizes", "Select", "Squeeze", "Unsqueeze", "Expand",
                    "Alias", "Narrow"}


def ofd_margin(bn: nn.BatchNorm2d) -> torch.Tensor:
    """Per-channel margin E[x | x < 0] of the BN's output modelled as N(bias, weight^2); -3 |weight| where
    P(x < 0) <= 1e-3. The affine parameters are the output statistics, as in the official code."""
    weight = bn.weight.detach() if bn.affine else torch.ones(bn.num_features, device=bn.running_mean.device)
    bias = bn.bias.detach() if bn.affine else torch.zeros_like(weight)
    std, mean = weight.double().abs(), bias.double()
    z = mean / std.clamp_min(1e-12)  # std 0: |z| is huge and the branches below give the limits (mean or 0)
    negative_mass = torch.special.ndtr(-z)
    density = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    conditional = mean - std * density / negative_mass.clamp_min(1e-300)
    return torch.where(negative_mass > NEGATIVE_MASS_FLOOR, conditional, -3 * std).to(weight.dtype)


def ofd_loss(f_s: torch.Tensor, f_t: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Partial L2 to the target `max(f_t, margin)`: squared error summed over all elements except where
    `f_s <= target <= 0` (the student is already below a negative target), divided by the batch size.

    `f_s` is the connector's output; `f_t` the teacher's pre-ReLU feature, average-pooled to the student's
    spatial size when they differ (as mdistiller does); `margin` has one value per channel."""
    if f_t.shape[2:] != f_s.shape[2:]:
        f_t = F.adaptive_avg_pool2d(f_t, f_s.shape[2:])
    target = torch.max(f_t.detach(), margin.view(1, -1, 1, 1).to(f_t))
    counted = (f_s > target) | (target > 0)
    return ((f_s - target) ** 2 * counted).sum() / f_s.shape[0]


def op_name(node) -> str:
    return type(node).__name__.rstrip("0123456789").removesuffix("Backward")


def nodes_making_up(root, stop_at: dict) -> list:
    """The autograd nodes in `stop_at` reached back from `root` through pass-through ops only."""
    found, queue, seen = [], deque([root]), set()
    while queue:
        node = queue.popleft()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in stop_at:
            found.append(node)
        elif op_name(node) in PASS_THROUGH_OPS:
            queue.extend(child for child, _ in node.next_functions)
    return found


def chain_lengths(root, counted: dict) -> dict:
    """For every node behind `root`: the most `counted` nodes on one path back to the input (iterative, so
    that deep nets do not hit the recursion limit)."""
    length: dict = {}
    stack = [root]
    while stack:
        node = stack[-1]
        if node in length:
            stack.pop()
            continue
        children = [child for child, _ in node.next_functions if child is not None]
        pending = [child for child in children if child not in length]
        if pending:
            stack.extend(pending)
            continue
        stack.pop()
        length[node] = max((length[child] for child in children), default=0) + (node in counted)
    return length


def feeding_batchnorm(model: nn.Module, layer: str, input_shape) -> nn.BatchNorm2d | None:
    """The BatchNorm2d that produces `layer`'s tensor of `model`, or None.

    Found from the autograd graph of one dummy forward, not from module names. The candidates are the BNs
    whose outputs make up the feature, reached back from it through residual sums, concatenations and
    reshapes only, and that have the feature's channel count; of those the one with the most BNs behind it
    wins. For a residual block `bn2(...) + shortcut(x)` that is the main branch's closing BN, not the
    projection shortcut's BN nor a BN that produced the identity input: the BN the official
    `get_bn_before_relu` names (bn2/bn3 of the last ResNet block, the last MobileNetV2 block's projection BN),
    and for a pre-activation WRN's `relu1:input` the `bn1` in front of that ReLU."""
    produced_by: dict = {}  # autograd node of a BN's output -> the BN

    def remember(bn, _inputs, output):
        produced_by.setdefault(output.grad_fn, bn)

    hooks = [m.register_forward_hook(remember) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    tap = FeatureTap(model, [layer])
    was_training = model.training
    try:
        model.eval()
        with torch.enable_grad():
            _, feats = tap(torch.zeros(2, *input_shape, device=model_device(model), requires_grad=True))
        feature = feats[layer]
        if feature.grad_fn is None:
            return None
        candidates = [node for node in nodes_making_up(feature.grad_fn, produced_by)
                      if produced_by[node].num_features == feature.shape[1]]
        if not candidates:
            return None
        depth = chain_lengths(feature.grad_fn, produced_by)
        return produced_by[max(candidates, key=depth.__getitem__)]
    finally:
        tap.remove()
        for hook in hooks:
            hook.remove()
        model.train(was_training)


def connector(s_channels: int, t_channels: int) -> nn.Sequential:
    """1x1 conv (no bias) + BN from the student's channels to the teacher's, initialised as officially."""
    conv = nn.Conv2d(s_channels, t_channels, 1, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / t_channels))  # He init over the output fan
    bn = nn.BatchNorm2d(t_channels)
    return nn.Sequential(conv, bn)


@register_method("ofd")
class OFD(Method):
    """Heo et al. 2019, A Comprehensive Overhaul of Feature Distillation: pre-ReLU features, margin ReLU, partial L2.

    Keys: `pairs` (student, teacher) pre-ReLU layers, default `auto`: every stage's pre-ReLU feature, as
    mdistiller's preact_feats[1:] (s1_pre..s3_pre for CIFAR ResNets, WRNs and ShuffleNets; s1_pre..s4_pre for
    VGG, MobileNetV2 and ResNet18/34/50). With different stage counts (wrn_16_2 -> vgg8: 3 and 4) the last k
    stages of each are paired, as mdistiller's `_align_list` does (kdrun takes each margin from the BN of the
    teacher layer actually paired). The teacher's margin per channel comes from the BN that produces its feature
    (`feeding_batchnorm`; a teacher layer without one, such as a ShuffleNetV2 stage, whose closing BN covers
    half the channels, is refused as the official code refuses that teacher), recomputed every step so it
    follows the trained teacher. The term `ofd` sums `ofd_loss` over the pairs, pair i of n weighted by
    1 / 2^(n - i - 1), and is weighted by `beta` (1e-3, mdistiller's FEAT_WEIGHT; clovaai divides by 1000).
    
    Unlike the official code (clovaai's and mdistiller's OFD put the teacher in train mode, so its features
    use batch statistics), the teacher here stays in eval mode like every kdrun teacher: frozen and
    reproducible. Expect small differences from the published OFD numbers for that reason.
    """

    term_names = ("ofd",)
    official_code = ("mdistiller mdistiller/distillers/OFD.py (preact_feats[1:], the last k stages when counts "
                     "differ); the teacher stays in eval mode, not train mode as there")

    def __init__(self, cfg, student, teacher, num_classes):
        super().__init__(cfg, student, teacher, num_classes)
        self.pairs = stage_pairs(cfg, "ofd", student, teacher, suffix="_pre", align_last=True)
        self.connectors = nn.ModuleList()
        self._margin_bns: tuple[nn.BatchNorm2d, ...] = ()  # the teacher's: a tuple keeps them out of this module

    def build(self, s_shapes, t_shapes) -> None:
        bns = []
        for s, t in self.pairs:
            require_feature_maps("ofd", (s, t), s_shapes[s], t_shapes[t])
            bn = feeding_batchnorm(self.teacher, t, self.input_shape)
            if bn is None:
                raise pair_error("ofd", (s, t), s_shapes[s], t_shapes[t],
                                 f"teacher layer {t} of {model_label(self.teacher)} is not the output of a BatchNorm2d "
                                 "with its channel count, so it has no margin: use pre-ReLU layers closed by a BN")
            bns.append(bn)
            self.connectors.append(connector(s_shapes[s][0], t_shapes[t][0]))
        self._margin_bns = tuple(bns)
        self.connectors.to(model_device(self.student))  # built after the method moved to its device

    def method_terms(self, fw: Forward) -> dict[str, torch.Tensor]:
        n = len(self.pairs)
        total = 0.0
        for i, ((s, t), conn, bn) in enumerate(zip(self.pairs, self.connectors, self._margin_bns)):
            # earlier (shallower) pairs count less: the last pair 1, the one before 1/2, ...
            total = total + ofd_loss(conn(fw.s_feats[s]), fw.t_feats[t], ofd_margin(bn)) / 2 ** (n - i - 1)
        return {"ofd": total}
