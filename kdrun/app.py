"""The Hydra task: one experiment per call (a single run, or one job of a multirun sweep)."""
from __future__ import annotations

import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from kdrun.errors import ConfigError
from kdrun.experiment import base_record, run
from kdrun.progress import console
from kdrun.results import RESULT_FILE, write_result


def experiment_job(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        try:
            run(cfg)
        except ConfigError as exc:
            console.print(f"[bold red]kdrun: error:[/bold red] {exc}", highlight=False, soft_wrap=True)
            sys.exit(2)
        return
    # A sweep job: its directory is Hydra's; a failure is recorded there and the sweep goes on.
    job_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        run(cfg, job_dir)
    except Exception as exc:  # noqa: BLE001 - one job's failure must not stop the sweep
        console.print(f"[bold red]job {hydra_cfg.job.num} failed:[/bold red] {exc}", highlight=False, soft_wrap=True)
        result = job_dir / RESULT_FILE
        if not result.exists():  # refused before training: record why
            record = base_record(cfg, job_dir, str(cfg.device)) if _safe(cfg) else {"run_dir": str(job_dir)}
            record.update(status="failed", error=f"{type(exc).__name__}: {exc}")
            write_result(result, record)


def _safe(cfg: DictConfig) -> bool:
    try:
        base_record(cfg, Path("."), "")
        return True
    except Exception:  # noqa: BLE001 - the config itself may be what failed
        return False
