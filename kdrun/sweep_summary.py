"""The end of a sweep: one table of what each job did (completed, skipped, failed with its error,
interrupted) and an exit status that says whether any job failed.

Each job writes its own report file, `<sweep dir>/.jobs/<num>.json` (no two processes ever write one file,
and it works the same for the basic, joblib, submitit and Ray launchers, whose jobs may run on other hosts of a
shared filesystem); a Hydra callback in the launching process reads them when the sweep ends. A job whose
report still says `running` then was killed without a word.
"""
from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kdrun.progress import print_unfolded
from kdrun.ray_launcher import wait_for_worker_output
from kdrun.results import read_result, write_result

REPORTS = ".jobs"
ORDER = ("completed", "skipped", "failed", "interrupted", "killed")
# Exit status of a sweep: 1 when any job failed (or died), else 130 when one was interrupted, else 0.
exit_status = 0


class JobReport:
    def __init__(self, sweep_dir: Path, num: int, overrides: list[str]):
        self.path = Path(sweep_dir) / REPORTS / f"{num}.json"
        self.num, self.overrides = num, overrides

    def write(self, status: str, run_dir: Path | None = None, error: str | None = None) -> None:
        try:
            write_result(self.path, {"job": self.num, "overrides": " ".join(self.overrides), "status": status,
                                     "run_dir": str(run_dir) if run_dir else None, "error": error})
        except OSError:
            pass  # a job's report must never be what fails the job (the run's own result.json holds it)


def read_reports(sweep_dir: Path) -> list[dict]:
    reports = [read_result(path) for path in sorted(Path(sweep_dir).glob(f"{REPORTS}/*.json"))]
    reports = [r for r in reports if r]
    for report in reports:
        if report["status"] == "running":
            report.update(status="killed", error=error_of(report) or "the job died without a report")
    return sorted(reports, key=lambda r: r["job"])


def error_of(report: dict) -> str | None:
    """A killed job's own result.json may still say why."""
    record = read_result(Path(report["run_dir"]) / "result.json") if report.get("run_dir") else None
    return record.get("error") if record else None


def status_of_sweep(reports: list[dict]) -> int:
    statuses = {r["status"] for r in reports}
    if statuses & {"failed", "killed"}:
        return 1
    return 130 if "interrupted" in statuses else 0


def summary_table(reports: list[dict]) -> Table:
    counts = ", ".join(f"{sum(r['status'] == s for r in reports)} {s}" for s in ORDER
                       if any(r["status"] == s for r in reports))
    table = Table(title=f"sweep: {len(reports)} jobs: {counts}")
    for column in ("job", "status", "overrides", "run dir / error"):
        table.add_column(column, no_wrap=True)  # paths and overrides are copied from here: never folded
    for report in reports:
        failed = report["status"] in ("failed", "killed", "interrupted")
        detail = report.get("error") if failed else shown_path(report.get("run_dir"))
        style = "red" if report["status"] in ("failed", "killed") else None
        table.add_row(str(report["job"]), report["status"], escape(report["overrides"]), escape(detail or ""),
                      style=style)
    return table


def shown_path(path: str | None) -> str | None:
    """A run directory relative to the working directory when it lies below it (shorter, still copyable)."""
    if not path:
        return path
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path


class SweepSummary(Callback):
    """Prints the summary when a multirun ends and sets `exit_status` for the CLI."""

    def on_multirun_start(self, config, **kwargs) -> None:
        """A sweep directory given twice (a fixed hydra.sweep.dir) must not report the earlier sweep's jobs."""
        global exit_status
        exit_status = 0
        for old in Path(config.hydra.sweep.dir).glob(f"{REPORTS}/*.json"):
            old.unlink(missing_ok=True)

    def on_multirun_end(self, config, **kwargs) -> None:
        global exit_status
        reports = read_reports(Path(config.hydra.sweep.dir))
        if not reports:
            return
        wait_for_worker_output()  # Ray's workers: their last lines first (a no-op for the other launchers)
        print_unfolded(Console(), summary_table(reports))
        exit_status = status_of_sweep(reports)
