"""Entry point: `kdrun ls ...` and `kdrun compare ...` subcommands, otherwise the Hydra app."""
from __future__ import annotations

import os
import sys

from kdrun.errors import ConfigError
from kdrun.progress import print_error

SUBCOMMANDS = ("ls", "compare")


def fail(message: str, code: int = 2) -> None:
    print_error("kdrun: error:", message)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    try:
        dispatch(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:  # `kdrun --help | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)


def dispatch(argv: list[str]) -> None:
    try:
        if argv and argv[0] in SUBCOMMANDS:
            from kdrun import commands

            sys.exit(commands.run_subcommand(argv[0], argv[1:]))
        from kdrun.overrides import check_group_choices, check_override_keys

        check_group_choices(argv)
        if not any(a in ("--help", "-h", "--hydra-help", "--info", "--shell-completion") for a in argv):
            check_override_keys(argv)
    except ConfigError as exc:
        fail(str(exc))
    run_hydra(argv)


def run_hydra(argv: list[str]) -> None:
    import hydra

    from kdrun.app import experiment_job
    from kdrun.config_store import register_model_groups
    from kdrun.paths import conf_dir

    register_model_groups()
    sys.argv = ["kdrun", *argv]
    hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(experiment_job)()
