"""torchvision's classification models, `torchvision/<name>`: torchvision.models.get_model with the dataset's
classes; other than 3 input channels by replacing the first 3-channel convolution; published weights through
`weights="DEFAULT"`. Aliases from one dummy forward at 224x224 (kdrun/models/library_aliases.py)."""
from __future__ import annotations

import difflib
from pathlib import Path

import torch
from torch import nn

from kdrun.errors import ConfigError
from kdrun.models.library import OptionRefused, error_text, quiet_loading
from kdrun.models.library_aliases import torchvision_aliases

INSTALL = "pip install torchvision"
# Built with auxiliary heads unless told; their random initialisation warns unless chosen explicitly.
AUX_HEADS = ("googlenet", "inception_v3")


def available() -> bool:
    return True


def model_names(name: str = "", pattern: str = "*") -> list[str]:
    """The classification models (`torchvision.models` itself, not detection, segmentation, video, ...)."""
    from torchvision import models

    return models.list_models(module=models, include=pattern)


def close_matches(name: str) -> list[str]:
    return difflib.get_close_matches(name, model_names(), n=3, cutoff=0.6)


def is_model(name: str) -> bool:
    return name in model_names()


def default_weights(name: str):
    from torchvision.models import get_model_weights

    return get_model_weights(name).DEFAULT


def published_classes(name: str) -> int | None:
    categories = default_weights(name).meta.get("categories")
    return len(categories) if categories else None


def load_published(name: str) -> nn.Module:
    """torchvision with its published weights, from the torch hub cache or downloaded into it. Offline, with
    the file in no cache, this is where it fails."""
    from torchvision.models import get_model

    with quiet_loading():
        return get_model(name, weights="DEFAULT", progress=False)


def build(name: str, num_classes: int, in_channels: int, pretrained: bool) -> nn.Module:
    from torchvision.models import get_model

    if pretrained:
        classes = published_classes(name)
        if in_channels not in (1, 3):
            raise OptionRefused("pretrained", True, f"is not allowed for torchvision/{name} with {in_channels}-"
                                "channel images: its published first convolution takes 3 channels (or 1, by "
                                "summing them); set {key}=false")
        model = loaded(name)
        adapt_first_conv(model, name, in_channels, pretrained=True)
        if classes is not None and classes != num_classes:
            replace_head(model, classes, num_classes)
        model.pretrained_classes = classes
    else:
        kwargs = {"aux_logits": False, "init_weights": True} if name in AUX_HEADS else {}
        model = get_model(name, weights=None, num_classes=num_classes, **kwargs)
        adapt_first_conv(model, name, in_channels, pretrained=False)
    one_output(model, in_channels)
    model.feature_aliases = dict(aliases_of(name, in_channels, model, num_classes))
    return model


def one_output(model: nn.Module, in_channels: int) -> None:
    """GoogLeNet's and Inception's train-mode forward also returns auxiliary logits, which kdrun's one training
    loop does not take: switched off as torchvision does for aux_logits=False (its published Inception keeps
    them). Their `transform_input` re-normalises three RGB channels, which other channel counts lack."""
    if getattr(model, "aux_logits", False):
        model.aux_logits = False
        for head in ("aux1", "aux2", "AuxLogits"):
            if hasattr(model, head):
                setattr(model, head, None)
    if in_channels != 3 and getattr(model, "transform_input", False):
        model.transform_input = False


def loaded(name: str) -> nn.Module:
    try:
        return load_published(name)
    except Exception as exc:  # noqa: BLE001 - offline, a proxy, a damaged file: the remedy is the same
        file = Path(str(default_weights(name).url)).name
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        raise OptionRefused("pretrained", True, f"cannot load torchvision's published weights of torchvision/{name} "
                            f"({error_text(exc)}): put {file} in the torch hub cache ({hub}), or set "
                            "{key}=false") from None


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    """The first 3-channel convolution (by definition order, which is forward order in torchvision's models)."""
    return next(((path, m) for path, m in model.named_modules()
                 if isinstance(m, nn.Conv2d) and m.in_channels == 3 and m.groups == 1), None)


def adapt_first_conv(model: nn.Module, name: str, in_channels: int, pretrained: bool) -> None:
    """Make the first 3-channel convolution take `in_channels`. Published weights are summed over their input
    channels (timm's convention for one channel: a grey image gives the response of the same image in RGB);
    random weights are drawn as torchvision draws its convolutions' (Kaiming normal, fan_out)."""
    if in_channels == 3:
        return
    found = first_conv(model)
    if found is None:
        raise ConfigError(f"torchvision/{name} cannot take {in_channels}-channel images: it has no 3-channel "
                          "first convolution to adapt")
    path, conv = found
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode)
    with torch.no_grad():
        if pretrained:
            new.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        else:
            nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    model.set_submodule(path, new)


def replace_head(model: nn.Module, classes: int, num_classes: int) -> None:
    """A fresh final classifier for a pretrained student of another dataset: the last Linear (or 1x1
    convolution, SqueezeNet's) that outputs the published weights' classes."""
    heads = [(path, m) for path, m in model.named_modules()
             if (isinstance(m, nn.Linear) and m.out_features == classes)
             or (isinstance(m, nn.Conv2d) and m.out_channels == classes and m.kernel_size == (1, 1))]
    if not heads:
        raise OptionRefused("pretrained", True, f"is not allowed: no final layer with {classes} outputs to give "
                                                f"{num_classes} classes; set {{key}}=false")
    path, old = heads[-1]
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, 1, bias=old.bias is not None)
    model.set_submodule(path, new)


def aliases_of(name: str, in_channels: int, model: nn.Module, num_classes: int) -> tuple:
    """The aliases depend on the architecture alone, so one 224x224 forward per (name, channels) suffices."""
    key = (name, in_channels, num_classes)
    if key not in ALIAS_CACHE:
        ALIAS_CACHE[key] = tuple(torchvision_aliases(model, in_channels, num_classes).items())
    return ALIAS_CACHE[key]


ALIAS_CACHE: dict[tuple, tuple] = {}
