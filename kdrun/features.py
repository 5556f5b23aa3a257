"""Tap intermediate features by model alias (`s2`), module path (`layer2.1`), pre-activation (`path:input`) or
torch.fx node (`fx:layer3.1.add`).

Aliases and module paths are forward hooks on the model itself. `fx:` names need the graph: then the tap
runs the model through a torchvision feature extractor (`create_feature_extractor`), a graph module built
from the model's own submodules, so it shares the model's parameters and training the tap trains the model.
Either way `logits, feats = tap(x)`. `feature_shapes` runs one dummy forward before training, so bad names,
modules that fire twice and fx graphs that disagree with the model are refused up front, and returns the
recorded shapes for sizing adapters.
"""
from __future__ import annotations

import contextlib
import difflib
import re
from typing import Sequence

import torch
from omegaconf import ListConfig, OmegaConf
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from kdrun.errors import ConfigError

INPUT_SUFFIX = ":input"
FX_PREFIX = "fx:"
LAST_STAGE = "last"  # a layer name meaning "this model's deepest stage", whatever its number of stages
STAGE_ALIAS = re.compile(r"s(\d+)")


def model_label(model: nn.Module) -> str:
    return getattr(model, "model_name", type(model).__name__)


def model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def is_fx(name: str) -> bool:
    return name.startswith(FX_PREFIX)


def last_stage_alias(model: nn.Module) -> str:
    """The highest-numbered stage alias (`s3` for CIFAR ResNets, `s4` for VGG, ...): what `last` means."""
    stages = [a for a in getattr(model, "feature_aliases", {}) if STAGE_ALIAS.fullmatch(a)]
    if not stages:
        raise ConfigError(f"layer '{LAST_STAGE}' is not allowed for {model_label(model)}: it has no stage aliases "
                          "(s1, s2, ...); name the layer instead")
    return max(stages, key=lambda a: int(a[1:]))


def layer_path(model: nn.Module, name: str) -> str:
    """The module path (possibly ending in `:input`) an alias, `last` or module path refers to."""
    aliases = getattr(model, "feature_aliases", {})
    if name == LAST_STAGE and name not in aliases:
        name = last_stage_alias(model)
    return aliases.get(name, name)


def resolve_layer(model: nn.Module, name: str) -> tuple[nn.Module, bool]:
    """The module a feature name refers to, and whether its input (True) or output (False) is tapped."""
    aliases = getattr(model, "feature_aliases", {})
    path = layer_path(model, name)
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
            f"(aliases: {', '.join(aliases)}; fx nodes with an fx: prefix; see `kdrun ls layers "
            f"{model_label(model)} --fx`)"
        ) from None


# ----- torch.fx nodes ---------------------------------------------------------------------------------------
def fx_node_names(model: nn.Module) -> list[str]:
    """torchvision's node names of the model's graph (eval mode), in execution order."""
    was_training = model.training
    try:
        _, eval_nodes = get_graph_node_names(model, suppress_diff_warning=True)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means the same thing to the user
        raise ConfigError(f"fx: taps are not allowed for {model_label(model)}: torch.fx cannot trace it "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                          "use an alias or module path") from None
    finally:
        model.train(was_training)
    return eval_nodes


def node_matches(query: str, node: str) -> bool:
    """torchvision's rule: a query names a node, or a module whose last node inside it is returned."""
    return re.match(rf"^{re.escape(query)}(\.|$)", node) is not None


def check_fx_node(model: nn.Module, name: str, nodes: Sequence[str]) -> None:
    query = name[len(FX_PREFIX):]
    if any(node_matches(query, node) for node in nodes):
        return
    close = difflib.get_close_matches(query, nodes, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(FX_PREFIX + c for c in close)}?" if close else ""
    raise ConfigError(f"unknown fx node '{name}' for {model_label(model)}{hint} "
                      f"(see `kdrun ls layers {model_label(model)} --fx`)")


def build_extractor(model: nn.Module, nodes_by_name: dict[str, str]) -> tuple[nn.Module, str]:
    """A graph module over the model's own submodules returning {node: tensor}, and the key of the model's
    output among them: the graph's last node, as for every model whose forward ends by computing its logits."""
    graph_nodes = fx_node_names(model)
    for name in nodes_by_name:
        if is_fx(name):
            check_fx_node(model, name, graph_nodes)
    return_nodes = {node: node for node in nodes_by_name.values()}
    output_node = graph_nodes[-1]
    return_nodes.setdefault(output_node, output_node)
    return create_feature_extractor(model, return_nodes=return_nodes, suppress_diff_warning=True), output_node


# ----- the tap ----------------------------------------------------------------------------------------------
class FeatureTap:
    """Records the named features of `model` during each forward: `logits, feats = tap(x)`.

    Without fx names every feature is a forward hook. With fx names the forward runs through the extractor:
    fx nodes and module outputs (torchvision resolves a module path to the last node inside the module) are
    graph outputs, while `:input` taps stay hooks, which fire because the graph calls the model's own leaf
    modules.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]):
        self.model = model
        self.names = list(dict.fromkeys(names))
        self._store: dict[str, torch.Tensor] = {}
        self._armed = False  # hooks record only inside __call__, not when the model runs alone (evaluation)
        self._fired_twice: list[str] = []
        self._extractor: nn.Module | None = None
        self._output_key = ""
        self._graph_outputs: dict[str, str] = {}  # feature name -> extractor output key
        hooked = self.names
        if any(is_fx(n) for n in self.names):
            hooked = [n for n in self.names if not is_fx(n) and resolve_layer(model, n)[1]]
            self._graph_outputs = {n: n[len(FX_PREFIX):] if is_fx(n) else layer_path(model, n)
                                   for n in self.names if n not in hooked}
            self._extractor, self._output_key = build_extractor(model, self._graph_outputs)
        self._handles = [self._hook(name) for name in hooked]

    def _hook(self, name: str):
        module, take_input = resolve_layer(self.model, name)

        def record(_module, inputs, output):
            if not self._armed:
                return
            if name in self._store:
                self._fired_twice.append(name)
            self._store[name] = inputs[0] if take_input else output

        return module.register_forward_hook(record)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self._store, self._armed = {}, True
        try:
            if self._extractor is None:
                logits = self.model(x)
            else:
                self._follow_model_mode()
                out = self._extractor(x)
                logits = out[self._output_key]
                self._store.update({name: out[key] for name, key in self._graph_outputs.items()})
        finally:
            self._armed = False
        feats, self._store = self._store, {}
        return logits, feats

    def _follow_model_mode(self) -> None:
        """The model's mode picks the extractor's train or eval graph; switching it must not change the mode
        of any shared submodule (a method may keep some in eval mode while the model trains)."""
        if self._extractor.training == self.model.training:
            return
        modes = [(module, module.training) for module in self.model.modules()]
        self._extractor.train(self.model.training)
        for module, mode in modes:
            module.training = mode

    def check(self, feats: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in feats]
        if self._fired_twice:
            twice, self._fired_twice = self._fired_twice[0], []
            raise ConfigError(f"layer '{twice}' of {model_label(self.model)} runs more than once per forward; "
                              "tap a module that runs once (e.g. one block of the stage) or one call of it "
                              "with an fx: node")
        if missing:
            raise ConfigError(f"layer '{missing[0]}' of {model_label(self.model)} never ran in the forward pass")

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _dummy_forward(tap: FeatureTap, input_shape: Sequence[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, *input_shape, generator=generator).to(model_device(tap.model))
    logits, feats = tap(x)
    tap.check(feats)
    return logits, feats


@torch.no_grad()
def feature_shapes(model: nn.Module, names: Sequence[str], input_shape: Sequence[int]) -> dict[str, torch.Size]:
    """Shapes (without batch) of the named features for one dummy input; refuses bad names first.

    Hooks validate every alias and module path on the model itself (unknown, fired twice, never ran). With
    fx names the extractor must then reproduce the model's output and those same features. Last, a forward
    with the `inplace` flag of every module switched off must record the same values: a tapped tensor that a
    later in-place module overwrites (a BN output before ReLU(inplace=True)) would silently be the wrong
    feature. (In-place tensor ops written in a forward, like `x += y`, are not covered.)"""
    names = list(dict.fromkeys(names))
    hooked = [n for n in names if not is_fx(n)]
    was_training = model.training
    model.eval()
    taps = [FeatureTap(model, hooked)]
    try:
        logits, feats = _dummy_forward(taps[0], input_shape)
        if len(hooked) < len(names):
            taps.append(FeatureTap(model, names))
            fx_logits, fx_feats = _dummy_forward(taps[1], input_shape)
            if not _same(logits, fx_logits):
                raise ConfigError(f"fx: taps are not allowed for {model_label(model)}: the last node of its torch.fx "
                                  "graph is not its output; use an alias or module path")
            for name in hooked:
                if not _same(feats[name], fx_feats[name]):
                    raise ConfigError(f"layer '{name}' of {model_label(model)} cannot be tapped together with fx: "
                                      "nodes (the last graph node inside its module is not its output); tap it "
                                      "as an fx: node instead")
            feats = fx_feats
        with inplace_switched_off(model):
            _, clean = _dummy_forward(taps[-1], input_shape)
        for name in names:
            if not _same(clean[name], feats[name]):
                raise ConfigError(f"layer '{name}' of {model_label(model)} is overwritten later in the forward by "
                                  "an in-place operation (e.g. ReLU(inplace=True)); tap that operation or a later "
                                  "layer instead")
        return {n: feats[n].shape[1:] for n in names}
    finally:
        for tap in taps:
            tap.remove()
        model.train(was_training)


@contextlib.contextmanager
def inplace_switched_off(model: nn.Module):
    switched = [m for m in model.modules() if getattr(m, "inplace", False) is True]
    for module in switched:
        module.inplace = False
    try:
        yield
    finally:
        for module in switched:
            module.inplace = True


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to what two runs of the same ops may differ by (GPU kernels and TF32 are not bit-exact); the
    faults checked for (a rectified tensor, another node's output) differ on the scale of the values."""
    if a.shape != b.shape:
        return False
    scale = b.abs().max().item() if b.numel() else 0.0
    return torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-3 * scale + 1e-6)


def parameters_feeding(tap: FeatureTap, names: Sequence[str], input_shape: Sequence[int]) -> list[nn.Parameter]:
    """The model's trainable parameters that the named features depend on (e.g. the student up to a hint
    layer), found by autograd on one dummy forward in eval mode, so fx nodes and hooks work alike."""
    model = tap.model
    was_training = model.training
    model.eval()
    try:
        _, feats = tap(torch.zeros(2, *input_shape, device=model_device(model)))
        params = [p for p in model.parameters() if p.requires_grad]
        total = sum(feats[n].float().sum() for n in names)
        grads = torch.autograd.grad(total, params, allow_unused=True)
    finally:
        model.train(was_training)
    return [p for p, g in zip(params, grads) if g is not None]


# ----- layer pairings ---------------------------------------------------------------------------------------
def layer_pairs(value, key: str = "method.pairs") -> list[tuple[str, str]]:
    """`[[student, teacher], ...]` from the config (YAML or `'method.pairs=[[s1,s1],[s3,s3]]'`)."""
    if isinstance(value, ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    ok = isinstance(value, (list, tuple)) and len(value) > 0 and all(
        isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(n, str) and n for n in pair)
        for pair in value)
    if not ok:
        raise ConfigError(f"{key}={as_typed(value)} is not allowed: a non-empty list of [student, teacher] layer "
                          "names, e.g. [[s2,s2],[s3,s3]]")
    return [(s, t) for s, t in value]


def as_typed(value) -> str:
    """A config value as the shell override spells it: [[s1,s1],[s3,s3]], not [['s1', 's1'], ...]."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(as_typed(v) for v in value) + "]"
    return str(value)


def format_shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape)) if len(shape) else "scalar"


def pair_error(method: str, pair: tuple[str, str], s_shape, t_shape, needs: str) -> ConfigError:
    """The one-line refusal for a pair a method cannot reconcile, naming both shapes."""
    return ConfigError(f"method.pairs=[{pair[0]},{pair[1]}] is not allowed for {method}: student {pair[0]} is "
                       f"{format_shape(s_shape)} and teacher {pair[1]} is {format_shape(t_shape)}; {needs}")


# ----- `kdrun ls layers` ------------------------------------------------------------------------------------
def layer_table(model: nn.Module, input_shape: Sequence[int]) -> list[tuple[str, str, tuple]]:
    """(aliases or '', module path, shape) for every named module's output in forward order; a `path:input`
    alias gets its own row, with the module's input shape, just before the module's output row."""
    outputs: dict[str, tuple] = {}
    inputs: dict[str, tuple] = {}

    def record(path):
        def hook(_module, args, out):
            if args and isinstance(args[0], torch.Tensor):
                inputs.setdefault(path, tuple(args[0].shape[1:]))
            if isinstance(out, torch.Tensor):
                outputs.setdefault(path, tuple(out.shape[1:]))
        return hook

    handles = [module.register_forward_hook(record(path)) for path, module in model.named_modules() if path]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape, device=model_device(model)))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    by_path: dict[str, list[str]] = {}
    for alias, path in getattr(model, "feature_aliases", {}).items():
        by_path.setdefault(path, []).append(alias)
    rows = []
    for path, shape in outputs.items():
        input_path = path + INPUT_SUFFIX
        if input_path in by_path and path in inputs:
            rows.append((",".join(by_path[input_path]), input_path, inputs[path]))
        rows.append((",".join(by_path.get(path, [])), path, shape))
    return rows


def fx_node_table(model: nn.Module, input_shape: Sequence[int]) -> list[tuple[str, tuple]]:
    """(fx name, output shape) for every graph node that produces a tensor, in execution order."""
    nodes = fx_node_names(model)
    was_training = model.training
    extractor = create_feature_extractor(model.eval(), return_nodes=nodes, suppress_diff_warning=True).eval()
    try:
        with torch.no_grad():
            out = extractor(torch.zeros(1, *input_shape, device=model_device(model)))
    finally:
        model.train(was_training)
    return [(FX_PREFIX + n, tuple(out[n].shape[1:])) for n in nodes if isinstance(out.get(n), torch.Tensor)]
