"""One run as `kdrun` starts it, alone or as a sweep job: prepare (may refuse), choose the run directory (a new
one, or an incomplete twin to resume), then execute there under its lock. Over several processes (torchrun) rank 0
chooses the directory for all of them, and only it holds the lock and prints the summary."""
from __future__ import annotations

import contextlib
from pathlib import Path

from omegaconf import DictConfig

from kdrun import distributed
from kdrun.experiment import check_same_device, execute, prepare
from kdrun.interrupt import stop_on_signals
from kdrun.progress import console, print_summary
from kdrun.run_dir import RunLock, choose_run_dir
from kdrun.run_record import config_hash, default_run_dir
from kdrun.storage import check_output_space


def run(cfg: DictConfig, run_dir: Path | None = None, search: bool = False, on_target=None) -> dict:
    """Prepare (may refuse), choose the run directory (a new one, or an incomplete twin to resume), then
    execute there. `run_dir`: a directory given by a sweep; `search`: an incomplete twin elsewhere below
    results_dir may be resumed instead (sweep jobs); `on_target(path)` hears which directory was chosen.
    SIGTERM and SIGINT stop the run cleanly from the start of `prepare` on."""
    with stop_on_signals():
        return run_with_handlers(cfg, run_dir, search, on_target)


def run_with_handlers(cfg: DictConfig, run_dir: Path | None, search: bool, on_target) -> dict:
    plan = prepare(cfg)
    explicit = Path(run_dir) if run_dir else (Path(cfg.run_dir) if cfg.get("run_dir") else None)
    # rank 0 chooses the directory (a new one, or a twin to resume) for every process
    target = distributed.from_main(lambda: choose_run_dir(cfg, config_hash(cfg), explicit, lambda: default_run_dir(cfg),
                                                          search))
    if on_target is not None:
        on_target(target.path)
    if target.completed is not None:
        console.print(f"{target.path} already holds this configuration, completed; left alone", highlight=False,
                      soft_wrap=True)
        print_summary(target.completed)
        return target.completed
    check_same_device(target, plan.settings.device)
    check_output_space(cfg, plan, target.path)
    with RunLock(target.path) if distributed.is_main() else contextlib.nullcontext():
        record = execute(plan, target.path, resume=target.resume)
    if distributed.is_main():
        print_summary(record)
    return record
