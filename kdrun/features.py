"""Tap intermediate features by model alias (`s2`), module path (`layer2.1`) or pre-activation (`path:input`).

Taps are forward hooks on the model itself, so the model's normal forward returns the logits and the tap
returns the recorded features alongside. `validate_taps` runs one dummy forward before training so bad
names and modules that fire twice are refused up front, with the recorded shapes for sizing adapters.
"""
from __future__ import annotations

import difflib
from typing import Sequence

import torch
from torch import nn

from kdrun.errors import ConfigError

INPUT_SUFFIX = ":input"


def model_label(model: nn.Module) -> str:
    return getattr(model, "model_name", type(model).__name__)


def resolve_layer(model: nn.Module, name: str) -> tuple[nn.Module, bool]:
    """The module a feature name refers to, and whether its input (True) or output (False) is tapped."""
    aliases = getattr(model, "feature_aliases", {})
    path = aliases.get(name, name)
    take_input = path.endswith(INPUT_SUFFIX)
    if take_input:
        path = path[: -len(INPUT_SUFFIX)]
    try:
        return (model if path == "" else model.get_submodule(path)), take_input
    except AttributeError:
        known = list(aliases) + [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"unknown layer '{name}' for {model_label(model)}{hint} "
            f"(aliases: {', '.join(aliases)}; see `kdrun ls layers {model_label(model)}`)"
        ) from None


class FeatureTap:
    """Records the named features of `model` during each forward: `logits, feats = tap(x)`."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        self.model = model
        self.names = list(dict.fromkeys(names))
        self._store: dict[str, torch.Tensor] = {}
        self._fired_twice: list[str] = []
        self._handles = [self._hook(name) for name in self.names]

    def _hook(self, name: str):
        module, take_input = resolve_layer(self.model, name)

        def record(_module, inputs, output):
            if name in self._store:
                self._fired_twice.append(name)
            self._store[name] = inputs[0] if take_input else output

        return module.register_forward_hook(record)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self._store = {}
        logits = self.model(x)
        feats, self._store = self._store, {}
        return logits, feats

    def check(self, feats: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in feats]
        if self._fired_twice:
            twice, self._fired_twice = self._fired_twice[0], []
            raise ConfigError(f"layer '{twice}' of {model_label(self.model)} runs more than once per forward; "
                              "tap a module that runs once (e.g. one block of the stage)")
        if missing:
            raise ConfigError(f"layer '{missing[0]}' of {model_label(self.model)} never ran in the forward pass")

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@torch.no_grad()
def feature_shapes(model: nn.Module, names: Sequence[str], input_shape: Sequence[int]) -> dict[str, torch.Size]:
    """Shapes (without batch) of the named features for one dummy input; refuses bad names first."""
    tap = FeatureTap(model, names)
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters(), None)
        device = param.device if param is not None else "cpu"
        _, feats = tap(torch.zeros(2, *input_shape, device=device))
        tap.check(feats)
        return {n: feats[n].shape[1:] for n in tap.names}
    finally:
        tap.remove()
        model.train(was_training)


def layer_table(model: nn.Module, input_shape: Sequence[int]) -> list[tuple[str, str, tuple]]:
    """(alias or '', module path, output shape) for every named module, in forward order."""
    shapes: dict[str, tuple] = {}
    handles = []
    for path, module in model.named_modules():
        if path:
            handles.append(module.register_forward_hook(
                lambda _m, _i, out, path=path: shapes.setdefault(path, tuple(out.shape[1:]))
                if isinstance(out, torch.Tensor) else None))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape))
    finally:
        for h in handles:
            h.remove()
    by_path = {}
    for alias, path in getattr(model, "feature_aliases", {}).items():
        by_path.setdefault(path, []).append(alias)
    rows = []
    for path, shape in shapes.items():
        rows.append((",".join(by_path.get(path, [])), path, shape))
    for path, aliases in by_path.items():
        if path.endswith(INPUT_SUFFIX):
            module, _ = resolve_layer(model, aliases[0])
            rows.append((",".join(aliases), path, ("input of " + path[: -len(INPUT_SUFFIX)],)))
    return rows
