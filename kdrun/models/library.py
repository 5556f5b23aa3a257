"""Models of the field's libraries by name: `timm/<name>` (timm.create_model) and `torchvision/<name>`
(torchvision.models.get_model), beside kdrun's own registry entries, with one option, `pretrained`.

Library names are resolved on demand and never enumerated at start-up: importing timm takes about a second,
so timm is imported only when a command names a timm model, and only the library models a command line
mentions become options of Hydra's `teacher`/`student` groups (`mentioned_models`)."""
from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
from typing import Callable

import torch
from torch import nn

from kdrun.errors import ConfigError

LIBRARIES = ("timm", "torchvision")
# A library model inside any override: `student=timm/a,timm/b`, `assistants=[torchvision/resnet18]`,
# `choice(timm/a, timm/b)`; timm names may carry a weight tag (`resnet18.a1_in1k`).
MENTION = re.compile(r"(?<![\w/.])((?:timm|torchvision)/[\w.\-]*\w)")


class OptionRefused(ConfigError):
    """A refused value of a model option. The factory does not know which node (teacher, student) the option
    came from; whoever does names it with `on(role)`. `reason` may say `{key}` where the key belongs."""

    def __init__(self, option: str, value, reason: str):
        self.option, self.value, self.reason = option, value, reason
        super().__init__(self.text(option))

    def text(self, key: str) -> str:
        return f"{key}={as_text(self.value)} {self.reason.format(key=key)}"

    def on(self, role: str) -> ConfigError:
        return ConfigError(self.text(f"{role}.{self.option}"))


def error_text(exc: BaseException) -> str:
    """`Type: first line` of a library's exception, cut to whole sentences within 160 characters where it is
    longer, free of format braces."""
    text = (str(exc).strip().splitlines() or [""])[0]
    if len(text) > 160:
        end = text.rfind(". ", 0, 160)
        text = text[:end + 1] if end > 0 else text[:157] + "..."
    text = text.replace("{", "(").replace("}", ")")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextlib.contextmanager
def quiet_loading(*loggers: str):
    """Load published weights without the libraries' own lines (torch.hub's `Downloading: ...`, timm's and
    huggingface_hub's log lines and retries): a failure is then the one line kdrun prints. After a success,
    what they wrote is passed on."""
    out, err = io.StringIO(), io.StringIO()
    levels = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    sys.stdout.write(out.getvalue())
    sys.stderr.write(err.getvalue())


def as_text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def split_name(name) -> tuple[str, str] | None:
    """`timm/resnet18` -> ("timm", "resnet18"); None for kdrun's own names."""
    library, sep, model = str(name).partition("/")
    return (library, model) if sep and library in LIBRARIES else None


def is_library_name(name) -> bool:
    return split_name(name) is not None


def backend(library: str):
    """The module that knows one library: available(), is_model, model_names, build, published_classes."""
    if library == "timm":
        from kdrun.models import timm_models

        return timm_models
    from kdrun.models import torchvision_models

    return torchvision_models


def known(name: str) -> bool:
    library, model = split_name(name)
    lib = backend(library)
    return lib.available() and lib.is_model(model)


def unknown_message(name: str, key: str | None = None) -> str:
    library, model = split_name(name)
    lib = backend(library)
    where = f"{key}={name}" if key else f"'{name}'"
    if not lib.available():
        return f"{where} needs {library}, which is not installed: {lib.INSTALL}"
    close = lib.close_matches(model)
    hint = f"; did you mean {', '.join(f'{library}/{c}' for c in close)}?" if close else ""
    return f"unknown {library} model {where}{hint} (list them: kdrun ls models --{library} 'PATTERN')"


def describe(name: str) -> str:
    library, model = split_name(name)
    return f"{library}'s {model}"


def factory(name: str) -> Callable[..., nn.Module]:
    """`f(num_classes, in_channels, pretrained=False)` for a library model, as a registry entry is."""
    if not known(name):
        raise ConfigError(unknown_message(name))
    library, model_name = split_name(name)

    def build(num_classes: int, in_channels: int, pretrained: bool = False) -> nn.Module:
        if not isinstance(pretrained, bool):
            raise OptionRefused("pretrained", pretrained, "is not allowed: true (the published weights) or false")
        model = backend(library).build(model_name, num_classes, in_channels, pretrained)
        model.library_model = name  # what check_runs_at tries at the dataset's size
        return model

    build.__doc__ = describe(name)
    return build


def mentioned_models(args) -> list[str]:
    """The library models named anywhere in these overrides or in the shipped recipes they choose
    (`+experiment=imagenet_resnet34_resnet18` names torchvision's), in order, once each."""
    texts = [str(arg) for arg in args] + recipe_texts(args)
    found = [m for text in texts for m in MENTION.findall(text)]
    return list(dict.fromkeys(found))


def recipe_texts(args) -> list[str]:
    """The YAML text of each experiment recipe that these overrides choose (a sweep may choose several)."""
    from kdrun.paths import conf_dir

    texts = []
    for arg in args:
        key, eq, value = str(arg).partition("=")
        if eq and key.lstrip("+~") == "experiment":
            for name in value.strip("[]").split(","):
                path = conf_dir() / "experiment" / f"{name.strip()}.yaml"
                if path.is_file():
                    texts.append(path.read_text())
    return texts


def published_classes(name: str) -> int | None:
    """How many classes the published weights classify (1000 for ImageNet); None when none are published."""
    library, model = split_name(name)
    return backend(library).published_classes(model)


def check_pretrained_teacher(node, num_classes: int, dataset: str) -> None:
    """A pretrained teacher is used as is, so its classifier must already be the dataset's: checked from the
    weights' metadata, before anything is downloaded."""
    if not is_library_name(node.name) or node.get("pretrained") is not True:
        return
    classes = published_classes(node.name)
    if classes is not None and classes != num_classes:
        raise ConfigError(f"teacher.pretrained=true is not allowed for teacher={node.name} on {dataset}: its "
                          f"published weights classify {classes} classes and {dataset} has {num_classes}, and a "
                          "pretrained teacher is used as is; set teacher.pretrained=false to train it on "
                          f"{dataset}, or use it as a pretrained student")


@torch.no_grad()
def check_runs_at(model: nn.Module, input_shape, what: str, instead: str) -> None:
    """One dummy forward at the data's size: ImageNet models downsample 32x, and some (max-pools without
    ceil_mode, fixed-size ViTs) fail on small images; say so in one line instead of failing mid-run."""
    if not hasattr(model, "library_model"):
        return
    was_training = model.training
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        model.eval()(torch.zeros(2, *input_shape, device=device))
    except Exception as exc:  # noqa: BLE001 - whatever the model raises, the cause is the input size
        size = "x".join(map(str, input_shape))
        raise ConfigError(f"{what} cannot run on {size} images ({error_text(exc)}); {instead}") from None
    finally:
        model.train(was_training)

