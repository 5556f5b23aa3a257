"""Feature aliases (`stem`, `s1..sN`, `pool`, `logits`) for library models, which do not declare kdrun's.

Stages are named from their output stride (input size / map size), the one thing every ImageNet classifier
shares: given the stage ends in forward order, each with its stride, `stem` is the last one at stride 2 or
less (C1 of a feature pyramid) and `s1, s2, ...` are the ones after it (C2..C5, strides 4, 8, 16, 32, on most
models). timm says where its stage ends are (`feature_info`); for torchvision `torchvision_stage_ends` finds
them with one dummy forward. `pool` taps the input of the final classifier layer and `logits` its output.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

# Stem strides: 2 on ImageNet models; a little more where a valid-padded stem rounds (Inception: 111 at 224).
STEM_MAX_STRIDE = 2.5
# torchvision's classification models are built for 224x224: there every stage has a size of its own.
PROBE_SIZE = 224


def stage_names(ends: Sequence[tuple[str, float]]) -> dict[str, str]:
    """(module path, stride) of each stage end, in forward order -> {stem, s1, s2, ...}."""
    early = [path for path, stride in ends if stride <= STEM_MAX_STRIDE]
    later = [path for path, stride in ends if stride > STEM_MAX_STRIDE]
    if not later:  # every end at the stem's stride: they are the stages
        early, later = [], [path for path, _ in ends]
    aliases = {"stem": early[-1]} if early else {}
    aliases.update({f"s{i}": path for i, path in enumerate(later, 1)})
    return aliases


def module_path(model: nn.Module, module: nn.Module) -> str | None:
    return next((path for path, m in model.named_modules() if m is module and path), None)


def head_aliases(classifier_path: str | None) -> dict[str, str]:
    if not classifier_path:
        return {}
    return {"pool": f"{classifier_path}:input", "logits": classifier_path}


# ----- torchvision: stage ends and head from one dummy forward -------------------------------------------------
class ForwardRecord:
    """Every module's output shape, call count and completion order in one eval-mode forward."""

    def __init__(self, model: nn.Module, input_shape: Sequence[int]):
        self.shapes: dict[str, tuple] = {}
        self.calls: dict[str, int] = {}
        self.order: list[str] = []  # paths as their forwards complete (a container after its children)
        handles = [module.register_forward_hook(self._hook(path)) for path, module in model.named_modules() if path]
        was_training = model.training
        try:
            with torch.no_grad():
                model.eval()(torch.zeros(1, *input_shape))
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)

    def _hook(self, path: str):
        def record(_module, _args, output):
            self.calls[path] = self.calls.get(path, 0) + 1
            if path not in self.shapes and isinstance(output, torch.Tensor):
                self.shapes[path] = tuple(output.shape[1:])
                self.order.append(path)
        return record

    def map_size(self, path: str) -> int | None:
        """The side of a square C x H x W map that this module alone produced (once); None otherwise. A
        channels-last grid (Swin's H x W x C) is not square in its last two dimensions, so it is left out."""
        shape = self.shapes.get(path)
        if shape is None or len(shape) != 3 or shape[1] != shape[2] or shape[1] <= 1 or self.calls[path] != 1:
            return None
        return shape[1]


def candidates(module: nn.Module, prefix: str, record: ForwardRecord):
    """The modules that may end a stage: the model's children and, where an nn.Sequential's children change
    the resolution (VGG's, MobileNet's and EfficientNet's `features`), its children instead. Only a
    Sequential is opened: in any other container, a child's output need not be the container's (residuals)."""
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        sizes = {record.map_size(f"{path}.{n}") for n, _ in child.named_children()} - {None}
        if isinstance(child, nn.Sequential) and len(sizes) > 1:
            yield from candidates(child, f"{path}.", record)
        elif not isinstance(child, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):  # the pooling, not a stage
            yield path


def torchvision_stage_ends(model: nn.Module, record: ForwardRecord) -> list[tuple[str, float]]:
    """The last candidate at each map size, in forward order, with its stride at the probe size."""
    last_at: dict[int, str] = {}
    for path in candidates(model, "", record):
        size = record.map_size(path)
        if size is not None and (size not in last_at or record.order.index(path) > record.order.index(last_at[size])):
            last_at[size] = path
    ends = sorted(last_at.values(), key=record.order.index)
    return [(path, PROBE_SIZE / record.map_size(path)) for path in ends]


def torchvision_head(model: nn.Module, record: ForwardRecord, num_classes: int) -> dict[str, str]:
    """`logits`: the last Linear whose output is the class scores. `pool`: its input, taken in front of any
    dropout just before it, so a training student's embedding is not the dropped-out one."""
    leaves = [p for p in record.order if not any(True for _ in model.get_submodule(p).children())]
    heads = [p for p in leaves if isinstance(model.get_submodule(p), nn.Linear) and record.shapes[p] == (num_classes,)]
    if not heads:
        return {}
    i = leaves.index(heads[-1])
    while i > 0 and isinstance(model.get_submodule(leaves[i - 1]), nn.Dropout):
        i -= 1
    return {"pool": f"{leaves[i]}:input", "logits": heads[-1]}


def torchvision_aliases(model: nn.Module, in_channels: int, num_classes: int) -> dict[str, str]:
    record = ForwardRecord(model, (in_channels, PROBE_SIZE, PROBE_SIZE))
    return {**stage_names(torchvision_stage_ends(model, record)), **torchvision_head(model, record, num_classes)}
