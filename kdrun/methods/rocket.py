"""Zhou et al. AAAI 2018, "Rocket Launching: A Universal and Efficient Framework for Training Well-performing
Light Net": a light net and a booster net share their lower layers and train together from scratch."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.errors import ConfigError
from kdrun.features import FeatureTap, feature_shapes, model_label
from kdrun.methods.base import Method, StepOutput
from kdrun.methods.common import config_number
from kdrun.methods.registry import register_method
from kdrun.models import MODELS, create_model

SHARED_ALIASES = ("stem", "s1")


def rocket_loss(z_light: torch.Tensor, z_booster: torch.Tensor) -> torch.Tensor:
    """The hint term `mean((z_light - z_booster)^2)` over all N x K logits, with the booster's logits detached
    (the paper's gradient block: the hint pulls the light net toward the booster, never the reverse)."""
    return F.mse_loss(z_light.float(), z_booster.detach().float())


class SharedTrunk(nn.Module):
    """The light net's lower layers standing in for the booster's: the very same module objects, so their
    parameters are shared, not copied. In a training step the light net has already computed their output;
    `reuse` hands it over, so the shared layers run (and update their BN statistics) once per step, and the
    booster's loss reaches them through that one output."""

    def __init__(self, layers: Sequence[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self._reused: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._reused is not None:
            return self._reused
        for layer in self.layers:
            x = layer(x)
        return x

    @contextmanager
    def reuse(self, features: torch.Tensor):
        self._reused = features
        try:
            yield
        finally:
            self._reused = None


def alias_path(model: nn.Module, alias: str) -> str:
    path = getattr(model, "feature_aliases", {}).get(alias)
    if path is None or path.endswith(":input"):
        raise ConfigError(f"method.shared={alias} is not allowed for {model_label(model)}: it has no module "
                          f"named {alias} (see `kdrun ls layers {model_label(model)}`)")
    return path


@torch.no_grad()
def layers_up_to(model: nn.Module, path: str, input_shape: Sequence[int], alias: str) -> list[str]:
    """Module paths that compute the output of `path`, in the order they run: at each level of `path` the
    sibling modules that finish before it starts, then `path` itself. Refuses modules that run again later
    (replacing those would change the rest of the network)."""
    parts = path.split(".")
    candidates = {}
    for depth in range(len(parts)):
        parent = ".".join(parts[:depth])
        for name, child in model.get_submodule(parent).named_children():
            candidates[f"{parent}.{name}" if parent else name] = child
    events: list[tuple[str, str]] = []
    handles = []
    for name, module in candidates.items():
        handles.append(module.register_forward_pre_hook(lambda *_, name=name: events.append(("start", name))))
        handles.append(module.register_forward_hook(lambda *_, name=name: events.append(("end", name))))
    was_training = model.training
    try:
        model.eval()(torch.zeros(2, *input_shape, device=next(model.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    start, end = events.index(("start", path)), events.index(("end", path))
    lower = [name for kind, name in events[:start] if kind == "end"] + [path]
    again = [name for kind, name in events[end:] if kind == "start" and name in lower]
    if again or len(set(lower)) != len(lower):
        raise ConfigError(f"method.shared={alias} is not allowed for {model_label(model)}: module "
                          f"'{(again or lower)[0]}' below {alias} runs more than once, so it cannot be shared")
    return lower


def share_lower_layers(booster: nn.Module, light: nn.Module, alias: str, input_shape: Sequence[int]) -> SharedTrunk:
    """Replace the booster's layers up to `alias` by the light net's (in place); returns the shared trunk.

    The booster's modules below `alias` become identities and its `alias` module becomes the light net's
    layers up to `alias`, so the booster's forward computes its upper layers on the light net's features.
    """
    light_path, booster_path = alias_path(light, alias), alias_path(booster, alias)
    light_shape = feature_shapes(light, [alias], input_shape)[alias]
    booster_shape = feature_shapes(booster, [alias], input_shape)[alias]
    if light_shape != booster_shape:
        raise ConfigError(f"method.shared={alias} is not allowed for {model_label(light)} with booster "
                          f"{model_label(booster)}: their {alias} outputs differ ({tuple(light_shape)} vs "
                          f"{tuple(booster_shape)}); choose method.shared from {', '.join(SHARED_ALIASES)} or "
                          "another method.booster with the same shapes there")
    light_layers = layers_up_to(light, light_path, input_shape, alias)
    booster_layers = layers_up_to(booster, booster_path, input_shape, alias)
    trunk = SharedTrunk([light.get_submodule(path) for path in light_layers])
    for path in booster_layers[:-1]:
        booster.set_submodule(path, nn.Identity())
    booster.set_submodule(booster_path, trunk)
    check_plain_sequence(booster, light, trunk, alias, input_shape)
    return trunk


@torch.no_grad()
def check_plain_sequence(booster: nn.Module, light: nn.Module, trunk: SharedTrunk, alias: str,
                         input_shape: Sequence[int]) -> None:
    """Sharing is only right if both forwards run their lower layers as a plain chain: the trunk must
    reproduce the light net's `alias` feature, and the booster must feed the trunk its raw input."""
    device = next(light.parameters()).device
    generator = torch.Generator(device=device).manual_seed(0)  # leaves the global RNG stream untouched
    x = torch.randn(2, *input_shape, device=device, generator=generator)
    tap = FeatureTap(light, [alias])
    fed: list[torch.Tensor] = []
    modes = (light.training, booster.training)
    light.eval(), booster.eval()
    try:
        _, feats = tap(x)
        same_feature = torch.allclose(trunk(x), feats[alias], rtol=1e-4, atol=1e-5)
        handle = trunk.register_forward_pre_hook(lambda _module, args: fed.append(args[0]))
        try:
            booster(x)
        finally:
            handle.remove()
    finally:
        tap.remove()
        light.train(modes[0]), booster.train(modes[1])
    if not same_feature:
        raise ConfigError(f"method.shared={alias} is not allowed for {model_label(light)}: its forward does more "
                          f"than run its layers up to {alias} one after another, so they cannot be shared")
    if len(fed) != 1 or not torch.equal(fed[0], x):
        raise ConfigError(f"method.shared={alias} is not allowed for booster {model_label(booster)}: its forward "
                          f"does more than run its layers up to {alias} one after another, so they cannot be "
                          "replaced")


@register_method("rocket")
class RocketLaunching(Method):
    """Zhou et al. AAAI 2018, Rocket Launching: light net + booster with shared lower layers, logit hint.

    The booster (`method.booster`, default the run's teacher model) trains from scratch with the light net
    (the run's student): `CE_light + CE_booster + lambda * mean((z_light - z_booster)^2)`, where the hint
    term's gradient never reaches the booster's own layers. The booster's layers up to `method.shared`
    (stem or s1) are replaced by the light net's, so they are literally shared; nets whose outputs there
    differ in shape are refused. Both nets are evaluated every epoch (light first: it is the run's model).
    One optimizer holds both nets; SGD state is per parameter, so this equals one optimizer per net.
    """

    needs_teacher = False

    @classmethod
    def configure(cls, cfg) -> None:
        booster = cfg.method.get("booster")
        if booster not in MODELS:
            raise ConfigError(MODELS.unknown_message(booster, "method.booster"))
        shared = cfg.method.get("shared")
        if shared not in SHARED_ALIASES:
            raise ConfigError(f"method.shared={shared} is not allowed: one of {', '.join(SHARED_ALIASES)}")
        config_number(cfg.method, "lambda", 1.0)

    def __init__(self, cfg, student: nn.Module, teacher: nn.Module | None, num_classes: int):
        super().__init__(cfg, student, teacher, num_classes)
        self.shared = str(cfg.shared)
        self.booster: nn.Module | None = None  # built in `build`, once the input shape is known
        self._trunk: tuple[SharedTrunk, ...] = ()  # a tuple: the trunk is already inside the booster's tree

    def student_layers(self) -> list[str]:
        return [self.shared]

    def build(self, s_shapes, t_shapes) -> None:
        device = next(self.student.parameters()).device
        self.booster = create_model(str(self.cfg.booster), self.num_classes, self.input_shape[0]).to(device)
        self._trunk = (share_lower_layers(self.booster, self.student, self.shared, self.input_shape),)

    def weights(self) -> dict[str, float]:
        return {"ce": 1.0, "ce_booster": 1.0, "hint": float(self.cfg["lambda"])}

    def eval_models(self) -> dict[str, nn.Module]:
        return {"light": self.student, "booster": self.booster}

    def forward(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> StepOutput:
        z_light, feats = self._student_tap(images)
        with self._trunk[0].reuse(feats[self.shared]):
            z_booster = self.booster(images)
        terms = {"ce": F.cross_entropy(z_light.float(), labels),
                 "ce_booster": F.cross_entropy(z_booster.float(), labels),
                 "hint": rocket_loss(z_light, z_booster)}
        return StepOutput(terms, z_light)
