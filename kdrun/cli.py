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
    except KeyboardInterrupt:  # Ctrl-C outside a run (a run records its own interruption)
        print_error("kdrun: interrupted:", "Ctrl-C")
        sys.exit(130)


def dispatch(argv: list[str]) -> None:
    try:
        if argv and argv[0] in SUBCOMMANDS:
            from kdrun import commands

            sys.exit(commands.run_subcommand(argv[0], argv[1:]))
        from kdrun.overrides import check_group_choices, check_override_keys, quote_boolean_choices

        argv = quote_boolean_choices(argv)  # compile=true names a group option, not a bool
        check_flag_combination(argv)
        argv = fuse_launcher(argv)
        check_group_choices(argv)
        if not any(a in ("--help", "-h", "--hydra-help", "--info", "--shell-completion") for a in argv):
            check_override_keys(argv)
    except ConfigError as exc:
        fail(str(exc))
    run_hydra(argv)


def check_flag_combination(argv: list[str]) -> None:
    """Hydra answers `-m --cfg job` with a traceback; say what works instead."""
    from kdrun.distributed import launched_world_size

    multirun = any(a in ("-m", "--multirun") for a in argv)
    processes = launched_world_size()
    if multirun and processes > 1:
        raise ConfigError(f"a sweep (-m) cannot run under torchrun ({processes} processes): start each job with "
                          "torchrun, or give the SLURM launcher several tasks per job (README: Scaling out)")
    shows = [a for a in argv if a in ("-c", "--cfg", "-i", "--info")]
    if multirun and shows:
        raise ConfigError(f"{shows[0]} cannot be combined with -m/--multirun: drop -m and give one value per key "
                          "to see one job's configuration, e.g. kdrun --cfg job method=kd")


def fuse_launcher(argv: list[str]) -> list[str]:
    """`fuse=true` / `fuse=K` in a sweep: the kdrun_fused launcher trains the jobs that differ only in method
    scalars, the student or the seed together (kdrun/fused). It is the launcher's setting, not the runs': their
    configs stay as alone. `fuse.data_seed=N` is `data_seed=N` for every job (seeds then share their batches)
    and implies fuse=true. `fuse.stack=true` (default false) steps the students of one architecture as one
    vmapped model (kdrun/fused/stacked.py), a launcher setting too; it implies fuse=true."""
    stacks = [a for a in argv if a.split("=", 1)[0] in ("fuse.stack", "+fuse.stack")]
    stack = None
    if stacks:
        argv = [a for a in argv if a not in stacks]
        raw = stacks[-1].split("=", 1)[1] if "=" in stacks[-1] else ""
        value = raw.strip().strip("'\"").lower()
        if value not in ("true", "false"):
            raise ConfigError(f"fuse.stack={raw} is not allowed: true or false")
        stack = value
        if stack == "true" and not any(a.split("=", 1)[0] in ("fuse", "+fuse") for a in argv):
            argv.append("fuse=true")
    data_seeds = [a for a in argv if a.split("=", 1)[0] in ("fuse.data_seed", "+fuse.data_seed")]
    if data_seeds:
        argv = [a for a in argv if a not in data_seeds]
        argv.append("data_seed=" + data_seeds[-1].split("=", 1)[1])
        if not any(a.split("=", 1)[0] in ("fuse", "+fuse") for a in argv):
            argv.append("fuse=true")
    fuses = [a for a in argv if a.split("=", 1)[0] in ("fuse", "+fuse")]
    if not fuses:
        return argv
    value = fuses[-1].split("=", 1)[1].strip().strip("'\"").lower()
    rest = [a for a in argv if a not in fuses]
    if value in ("false", "0", "no", "off"):
        if stack == "true":
            raise ConfigError(f"fuse.stack=true stacks the students of a fused group: it cannot be combined "
                              f"with fuse={value}")
        return rest
    if value in ("true", "yes", "on"):
        fuse = "true"
    elif value.isdigit() and int(value) >= 2:
        fuse = value
    else:
        raise ConfigError(f"fuse={value} is not allowed: true, false, or the most jobs per fused group (2 or more)")
    if not any(a in ("-m", "--multirun") for a in argv):
        raise ConfigError("fuse=... fuses the jobs of a sweep: give -m/--multirun with several values, e.g. "
                          "kdrun -m method.T=2,4 fuse=true")
    launchers = [a for a in rest if a.startswith("hydra/launcher=")]
    if launchers:
        raise ConfigError(f"fuse={value} trains fused jobs in this process: it cannot be combined with {launchers[0]}")
    settings = [f"hydra.launcher.fuse={fuse}"] + ([f"hydra.launcher.stack={stack}"] if stack else [])
    return [*rest, "hydra/launcher=kdrun_fused", *settings]


def run_hydra(argv: list[str]) -> None:
    import hydra

    from kdrun.app import experiment_job
    from kdrun.config_store import register_model_groups
    from kdrun.paths import conf_dir

    from kdrun import ray_launcher, sweep_summary

    ray_launcher.prepare(argv)
    register_model_groups(argv)
    from kdrun.fused.launcher import register_launcher

    register_launcher()
    sys.argv = ["kdrun", *argv]
    hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(experiment_job)()
    if sweep_summary.exit_status:  # a sweep with a failed (1) or interrupted (130) job
        sys.exit(sweep_summary.exit_status)
