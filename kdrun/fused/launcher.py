"""The `kdrun_fused` Hydra launcher (`kdrun -m ... fuse=true`, or fuse=K for at most K jobs per group).

It composes every job's configuration, groups the jobs that differ only in method scalars which leave the
batches unchanged (grouping.py), prints one line saying which, runs every other job as Hydra's basic launcher
does (through the kdrun task, in this process), and runs each group with the fused trainer (trainer.py). A
fused job is a sweep job like any other: Hydra's job directory, the skip of a completed twin and the resume of
an interrupted one, its run directory, report for the sweep's summary and the job callbacks.
"""
from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobRuntime, JobStatus, configure_log, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from rich.markup import escape

from kdrun.fused.grouping import group_jobs

FUSED_DIR = ".fused"  # <sweep dir>/.fused/<first job>.json: a group's jobs, batches and teacher forwards


# Hydra instantiates launchers of the `hydra_plugins` namespace only (and those it found there when it started):
# the class is registered under such a name here instead of shipping a second top-level package.
PLUGIN_MODULE = "hydra_plugins.kdrun_fused_launcher"
FUSED_LAUNCHER = "kdrun_fused"  # its name in the hydra/launcher group


def register_launcher() -> None:
    from hydra.core.plugins import Plugins

    import sys
    import types

    module = sys.modules.get(PLUGIN_MODULE) or types.ModuleType(PLUGIN_MODULE)
    module.FusedLauncher = FusedLauncher
    sys.modules[PLUGIN_MODULE] = module
    FusedLauncher.__module__ = PLUGIN_MODULE
    Plugins.instance()._register(FusedLauncher)
    ConfigStore.instance().store(group="hydra/launcher", name=FUSED_LAUNCHER,
                                 node={"_target_": f"{PLUGIN_MODULE}.FusedLauncher", "fuse": True, "stack": False})


def fuse_limit(fuse) -> int | None:
    """fuse=true: groups as large as they come; fuse=K: at most K jobs each."""
    return None if fuse is True else int(fuse)


class FusedLauncher(Launcher):
    def __init__(self, fuse=True, stack=False) -> None:
        super().__init__()
        if not isinstance(stack, bool):
            from kdrun.errors import ConfigError

            raise ConfigError(f"fuse.stack={stack} is not allowed: true or false")
        self.fuse, self.stack = fuse, stack  # stack: fuse.stack, the students as one vmapped model (stacked.py)
        self.config = self.task_function = self.hydra_context = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from kdrun.progress import console

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        configs = []
        for position, overrides in enumerate(job_overrides):
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = sweep_config.hydra.job.num = initial_job_idx + position
            configs.append(sweep_config)
        groups, alone = group_jobs([task_config(c) for c in configs], fuse_limit(self.fuse))
        console.print(escape(fusion_line(configs, groups, alone)), highlight=False, soft_wrap=True)
        first_of = {group[0]: group for group in groups}
        in_group = {p for group in groups for p in group}
        runs: list[JobReturn | None] = [None] * len(configs)
        for position, sweep_config in enumerate(configs):
            if position in first_of:
                for member, ret in zip(first_of[position], self.run_group([configs[p] for p in first_of[position]])):
                    runs[member] = ret
            elif position not in in_group:
                runs[position] = run_job(hydra_context=self.hydra_context, task_function=self.task_function,
                                         config=sweep_config, job_dir_key="hydra.sweep.dir",
                                         job_subdir_key="hydra.sweep.subdir")
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return runs

    def run_group(self, configs: list[DictConfig]) -> list[JobReturn]:
        from kdrun.fused.group import FusedGroup

        orig = HydraConfig.instance().cfg
        try:
            return FusedGroup(self.hydra_context, self.task_function, configs, self.stack).run()
        finally:
            HydraConfig.instance().cfg = orig


def task_config(config: DictConfig) -> DictConfig:
    task_cfg = copy.deepcopy(config)
    with read_write(task_cfg), open_dict(task_cfg):
        del task_cfg["hydra"]
    return task_cfg


def fusion_line(configs: list[DictConfig], groups: list[list[int]], alone: dict[int, str]) -> str:
    num = lambda p: str(configs[p].hydra.job.num)  # noqa: E731
    if not groups:
        return f"kdrun: fuse: no jobs can be fused; all {len(configs)} run alone"
    parts = [f"jobs {','.join(num(p) for p in g)} ({len(g)} jobs)" for g in groups]
    refused = sorted({reason for reason in alone.values() if "no other job" not in reason})
    rest = f"; {len(alone)} run alone" if alone else ""
    why = f" ({'; '.join(refused)})" if refused else ""
    return f"kdrun: fuse: {len(groups)} fused group{'s' if len(groups) > 1 else ''}: {', '.join(parts)}{rest}{why}"


def job_setup(config: DictConfig) -> DictConfig:
    """What Hydra's run_job does before calling the task: the job's output directory, its Hydra config."""
    HydraConfig.instance().set_config(config)
    output_dir = os.path.join(str(OmegaConf.select(config, "hydra.sweep.dir")),
                              str(OmegaConf.select(config, "hydra.sweep.subdir")))
    with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
        config.hydra.runtime.output_dir = os.path.abspath(output_dir)
    HydraConfig.instance().set_config(config)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    return task_config(config)


def job_return(config: DictConfig, task_cfg: DictConfig, error: BaseException | None = None) -> JobReturn:
    ret = JobReturn()
    ret.cfg, ret.hydra_cfg = task_cfg, copy.deepcopy(HydraConfig.instance().cfg)
    ret.overrides = list(OmegaConf.to_container(config.hydra.overrides.task))
    ret.working_dir = os.getcwd()
    ret.return_value, ret.status = (None, JobStatus.COMPLETED) if error is None else (error, JobStatus.FAILED)
    with contextlib.suppress(Exception):
        ret.task_name = JobRuntime.instance().get("name")
    return ret
