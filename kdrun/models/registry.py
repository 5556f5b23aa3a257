"""The model registry and the public factory `create_model`."""
from __future__ import annotations

import inspect

from torch import nn

from kdrun.errors import ConfigError
from kdrun.models import library
from kdrun.models.library import is_library_name
from kdrun.registry import Registry


class ModelRegistry(Registry):
    """kdrun's own models by name, and the libraries' as `timm/<name>` and `torchvision/<name>`
    (kdrun/models/library.py), which are looked up on demand: `names()` lists kdrun's own alone."""

    def get(self, name: str):
        if is_library_name(name):
            return library.factory(name)
        return super().get(name)

    def unknown_message(self, name: str, key: str | None = None) -> str:
        if is_library_name(name):
            return library.unknown_message(name, key)
        return super().unknown_message(name, key)

    def describe(self, name: str) -> str:
        return library.describe(name) if is_library_name(name) else super().describe(name)

    def __contains__(self, name: object) -> bool:
        if is_library_name(name):
            return library.known(str(name))
        return super().__contains__(name)


MODELS: Registry = ModelRegistry("model")

# Factory arguments that come from the dataset, not from the user's model options.
DATASET_ARGS = ("num_classes", "in_channels")


def register_model(name: str, description: str | None = None):
    """Register a factory `f(num_classes, in_channels, **options) -> nn.Module` under `name`.

    The module must carry `feature_aliases`: alias (stem, s1, s2, s3, s4, pool, logits, ...) -> module path,
    where a path ending in `:input` taps the module's input instead of its output (pre-activation features).
    """
    return MODELS.register(name, description)


def model_options(name: str) -> dict:
    """The user-settable options of a model with their defaults (e.g. `residual: true`)."""
    factory = MODELS.get(name)
    params = inspect.signature(factory).parameters.values()
    return {p.name: p.default for p in params if p.name not in DATASET_ARGS and p.default is not inspect.Parameter.empty}


def create_model(name: str, num_classes: int = 100, in_channels: int = 3, **options) -> nn.Module:
    """Build a registered model; unknown options are refused with the allowed ones named."""
    factory = MODELS.get(name)
    allowed = model_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        allowed_text = ", ".join(allowed) or "none"
        raise ConfigError(f"model {name} has no option {unknown[0]} (options: {allowed_text})")
    model = factory(num_classes=num_classes, in_channels=in_channels, **options)
    model.model_name = name
    return model


def file_label(name: str) -> str:
    """A model name as part of a file or directory name: `timm/resnet18` -> `timm_resnet18`."""
    return str(name).replace("/", "_")
