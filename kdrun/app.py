"""The Hydra task: one experiment per call (a single run, or one job of a multirun sweep)."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict
from rich.markup import escape

from kdrun import distributed
from kdrun.distributed_checks import check_ddp_keys
from kdrun.errors import ConfigError, OutputError, RunError
from kdrun.experiment import base_record, config_hash, configure
from kdrun.run_one import run
from kdrun.interrupt import Interrupted, stop_requested
from kdrun.interrupt import request as request_stop
from kdrun.progress import console, print_error
from kdrun.results import RESULT_FILE, read_result, write_result
from kdrun.sweep_summary import JobReport
from kdrun.train import NonFiniteLoss

# A run that started but could not finish: one line, exit status 1 (a refused configuration is 2).
RUN_FAILURES = (NonFiniteLoss, RunError, OutputError)


def interrupted_exit_code() -> int:
    """128 + the signal's number, as a shell reports a process that a signal ended."""
    name = stop_requested() or "SIGINT"
    return 128 + int(getattr(signal, name, signal.SIGINT))


def experiment_job(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        try:
            join_processes(cfg)
            run(cfg)
            distributed.close(finished=True)
        except ConfigError as exc:
            if distributed.is_main():  # every process refuses the same configuration: one line is enough
                print_error("kdrun: error:", exc)
            sys.exit(2)
        except OutputError as exc:  # a file in the way, a read-only or full disk: before or during training
            print_error("kdrun: error:", exc)
            sys.exit(1)
        except RUN_FAILURES as exc:  # the run's result.json already records the failure
            print_error("kdrun: training failed:", exc)
            sys.exit(1)
        except (Interrupted, KeyboardInterrupt) as exc:
            print_error("kdrun: interrupted:", str(exc) or "Ctrl-C")
            sys.exit(interrupted_exit_code())
        finally:
            distributed.close(finished=False)  # after a failure (a finished run has left already)
        return
    sweep_job(cfg, hydra_cfg)


def join_processes(cfg: DictConfig) -> None:
    """Under torchrun (or several SLURM tasks), join the others; only rank 0 prints, as only it writes."""
    check_ddp_keys(cfg.get("ddp") or {})
    try:
        world = distributed.setup(cfg.get("ddp") or {}, str(cfg.device))
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"could not join the other processes of this run (torch.distributed: "
                          f"{' '.join(str(exc).split())[:200]})") from None
    if world is not None and world.rank != 0:
        console.quiet = True


def sweep_job(cfg: DictConfig, hydra_cfg) -> None:
    """A sweep job: its directory is Hydra's; completed twins are skipped, killed twins resumed; a failure
    is recorded, not raised; each job reports its outcome for the sweep's summary."""
    try:
        join_processes(cfg)  # the SLURM launcher with several tasks per job: one run over the job's tasks
        sweep_job_alone(cfg, hydra_cfg)
        distributed.close(finished=True)
    finally:
        distributed.close(finished=False)


def sweep_job_alone(cfg: DictConfig, hydra_cfg) -> None:
    job_dir = Path(hydra_cfg.runtime.output_dir)
    num = hydra_cfg.job.num
    report = JobReport(Path(hydra_cfg.sweep.dir), num, list(hydra_cfg.overrides.task))
    if stop_requested():  # a signal stopped an earlier job of this process: start no more
        report.write("interrupted", job_dir, "not started: the sweep was stopped")
        _remove_if_empty(job_dir)
        return
    if cfg.get("skip_completed", True):
        try:
            configure(cfg)  # hash the configuration as the run records it
        except ConfigError:
            pass  # the run itself will refuse it and record why
        done = find_completed(Path(cfg.results_dir), config_hash(cfg))
        if done is not None:
            console.print(escape(f"job {num} skipped: the same configuration completed in {done}"), highlight=False)
            report.write("skipped", done)
            _remove_if_empty(job_dir)
            return
    share_machine(cfg, hydra_cfg)
    report.write("running", job_dir)
    chosen: list[Path] = []  # the run's directory: Hydra's, or an incomplete twin's that it resumes

    def on_target(path: Path) -> None:
        chosen.append(path)
        report.write("running", path)

    try:
        record = run(cfg, job_dir, search=True, on_target=on_target)
        report.write("completed", Path(record["run_dir"]))
    except (Interrupted, KeyboardInterrupt) as exc:
        request_stop("SIGINT")  # a Ctrl-C before the run's handlers were in place stops the sweep too
        print_error(f"job {num} interrupted:", str(exc) or "Ctrl-C")
        report.write("interrupted", chosen[-1] if chosen else job_dir, str(exc) or "Ctrl-C")
    except Exception as exc:  # noqa: BLE001 - one job's failure must not stop the sweep
        if type(exc).__name__ == "UncompletedJobError":
            raise  # submitit's own end of a timed-out job: it must see it
        print_error(f"job {num} failed:", exc)
        record_refusal(cfg, job_dir, chosen, exc)
        report.write("failed", chosen[-1] if chosen else job_dir,
                     str(exc) if isinstance(exc, (ConfigError, *RUN_FAILURES)) else f"{type(exc).__name__}: {exc}")
    _remove_if_empty(job_dir)  # a resumed twin elsewhere leaves Hydra's fresh directory unused


def record_refusal(cfg: DictConfig, job_dir: Path, chosen: list[Path], exc: Exception) -> None:
    """A job refused before its run wrote a record gets one in its directory, saying why."""
    if chosen and (chosen[-1] / RESULT_FILE).exists():
        return  # the run recorded its own failure
    try:
        record = base_record(cfg, job_dir, str(cfg.device))
    except Exception:  # noqa: BLE001 - the config itself may be what failed
        record = {"run_dir": str(job_dir)}
    record.update(status="failed", error=f"{type(exc).__name__}: {exc}")
    write_result(job_dir / RESULT_FILE, record)


def find_completed(results_dir: Path, wanted_hash: str) -> Path | None:
    """A run directory below results_dir whose result.json completed with this configuration hash."""
    for path in results_dir.glob("*/**/result.json"):
        if path.parts[len(results_dir.parts)] == "teachers":
            continue
        record = read_result(path)
        if record and record.get("status") == "completed" and record.get("config_hash") == wanted_hash:
            return path.parent
    return None


def share_machine(cfg: DictConfig, hydra_cfg) -> None:
    """Jobs that run side by side (joblib) split the CPU cores, and spread over the GPUs when there are several."""
    n_jobs = hydra_cfg.launcher.get("n_jobs") if "launcher" in hydra_cfg else None
    if isinstance(n_jobs, int) and n_jobs != 1:
        parallel = os.cpu_count() if n_jobs < 0 else n_jobs
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // parallel))
    if cfg.device == "auto" and torch.cuda.device_count() > 1:
        with open_dict(cfg):
            cfg.device = f"cuda:{hydra_cfg.job.num % torch.cuda.device_count()}"


def _remove_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        pass
