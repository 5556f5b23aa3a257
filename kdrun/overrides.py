"""Refuse unknown config-group choices (method=kdd, teacher=resnet9) and unknown keys (method.TT=2) with
one line and close matches, before Hydra runs anything."""
from __future__ import annotations

import difflib
import importlib.util

from kdrun.errors import ConfigError
from kdrun.fused.launcher import FUSED_LAUNCHER
from kdrun.paths import conf_dir
from kdrun.ray_launcher import RAY_LAUNCHERS, RAY_PLUGIN

MODEL_GROUPS = ("teacher", "student")


def group_options(group: str) -> list[str]:
    if group in MODEL_GROUPS:
        from kdrun.models import MODELS

        return MODELS.names()
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def file_groups() -> list[str]:
    return sorted(p.name for p in conf_dir().iterdir() if p.is_dir())


def split_choices(value: str) -> list[str]:
    """`kd,rkd` -> [kd, rkd]; sweep functions like choice(...) are left to Hydra."""
    if "(" in value:
        return []
    return [v.strip().strip("'\"") for v in value.split(",") if v.strip()]


BOOLEAN_OPTIONS = ("false", "true")


def quote_boolean_choices(argv: list[str]) -> list[str]:
    """`compile=true` -> `compile='true'`: Hydra reads an unquoted true/false as a bool, which it refuses as a
    group option; quoted, it names the option file (conf/compile/true.yaml). `compile=false,true` sweeps alike."""
    groups = set(file_groups())
    quoted = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        choices = [c.strip() for c in value.split(",")]
        if eq and key.lstrip("+~") in groups and all(c in BOOLEAN_OPTIONS for c in choices):
            arg = f"{key}=" + ",".join(f"'{c}'" for c in choices)
        quoted.append(arg)
    return quoted


LAUNCHER_GROUP = "hydra/launcher"


def launcher_options() -> list[str]:
    """kdrun's own launcher configs and those of the installed Hydra plugins."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    Plugins.instance()  # imports the installed plugins, which store their configs (Hydra does it next anyway)
    stored = [name.removesuffix(".yaml") for name in ConfigStore.instance().list(LAUNCHER_GROUP)]
    return sorted({*group_options(LAUNCHER_GROUP), *stored} - {FUSED_LAUNCHER})


def check_launcher_choices(argv: list[str]) -> None:
    """hydra/launcher=NAME: a launcher whose plugin is missing says which extra installs it, in one line."""
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq or key.lstrip("+~") != LAUNCHER_GROUP:
            continue
        options = None
        for choice in split_choices(value):
            if choice in RAY_LAUNCHERS and importlib.util.find_spec(RAY_PLUGIN) is None:  # imports no Ray
                raise ConfigError(f"hydra/launcher={choice} needs the Ray launcher plugin, which is not installed: "
                                  'pip install "kdrun[ray]"')
            if choice == FUSED_LAUNCHER:  # what fuse=true selects; not offered by name
                continue
            options = options or launcher_options()
            if choice not in options:
                close = difflib.get_close_matches(choice, options, n=3, cutoff=0.6)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise ConfigError(f"unknown {LAUNCHER_GROUP} '{choice}'{hint} (allowed: {', '.join(options)})")


def check_group_choices(argv: list[str]) -> None:
    from kdrun.models.library import is_library_name

    check_launcher_choices(argv)
    groups = set(MODEL_GROUPS) | set(file_groups())
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key not in groups:
            continue
        options = group_options(key)
        for choice in split_choices(value):
            if key in MODEL_GROUPS and is_library_name(choice):
                check_library_model(choice, key)
            elif choice not in options:
                close = difflib.get_close_matches(choice, options, n=3, cutoff=0.6)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                more = "; or timm/NAME, torchvision/NAME" if key in MODEL_GROUPS else ""
                raise ConfigError(f"unknown {key} '{choice}'{hint} (allowed: {', '.join(options)}{more})")


def check_library_model(name: str, key: str) -> None:
    from kdrun.models import MODELS

    if name not in MODELS:  # timm's and torchvision's names are not listed: the library is asked
        raise ConfigError(MODELS.unknown_message(name, key))


def check_override_keys(argv: list[str]) -> None:
    """Every `key=value` override must name an existing key (`+key=value` adds one, as in Hydra)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import DictConfig, OmegaConf

    from kdrun.config_store import compose_config

    parsed = OverridesParser.create().parse_overrides([a for a in argv if not a.startswith("-") and "=" in a])
    groups = set(MODEL_GROUPS) | set(file_groups())
    selections, keys = [], []
    for override in parsed:
        key = override.key_or_group
        if key.startswith("hydra") or override.is_delete():
            continue
        if override.is_add() or override.is_force_add():
            if key in groups:  # +experiment=..., +sweep=...: they shape the config
                selections.append(override.input_line)
            continue
        if key in groups:  # for a sweep over groups, the first choice stands for all
            first = next(iter(override.sweep_string_iterator())) if override.is_sweep_override() else override.value()
            selections.append(f"{key}={first}")
        else:
            keys.append(key)
    if not keys:
        return
    cfg = compose_config(selections)
    for key in keys:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if isinstance(node, DictConfig) and leaf in node:
            continue
        known = list(node.keys()) if isinstance(node, DictConfig) else []
        close = difflib.get_close_matches(leaf, known, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(f'{parent}.{c}' if parent else c for c in close)}? " if close else ""
        scope = f"keys of {parent}" if parent else "top-level keys"
        where = f"{scope}: {', '.join(map(str, known))}; " if known else ""
        raise ConfigError(f"unknown key {key} ({hint}{where}to add a new key write +{key}=...)")
