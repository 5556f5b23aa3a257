"""Refuse unknown config-group choices (method=kdd, teacher=resnet9) with one line and close matches,
before Hydra composes anything."""
from __future__ import annotations

import difflib

from kdrun.errors import ConfigError
from kdrun.paths import conf_dir

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


def check_group_choices(argv: list[str]) -> None:
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
            if choice not in options:
                close = difflib.get_close_matches(choice, options, n=3, cutoff=0.6)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise ConfigError(f"unknown {key} '{choice}'{hint} (allowed: {', '.join(options)})")
