"""Live progress (rich bars with loss and accuracy) and the end-of-run summary table.

On a terminal: one bar per stage that advances every step and shows the last epoch's figures.
Elsewhere (logs, CI, sweeps): one plain line per epoch, so logs stay readable. Progress and messages go to
stderr; the summary table and the final results path go to stdout, so `kdrun ... > run.txt` keeps the result.
"""
from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)
stdout = Console()


MAX_TABLE_WIDTH = 10_000


def print_unfolded(console: Console, table: Table) -> None:
    """Print the table as wide as its cells need, past the console's width if need be: a value folded or
    cut to fit (`94.00 ±` over `1.00`, `wide_res…`) is misread, a line the terminal wraps is still whole.
    The caption wraps to the table's width."""
    natural = Measurement.get(console, console.options.update(max_width=MAX_TABLE_WIDTH), table).maximum
    console.width = max(console.width, natural)  # print(width=...) would be capped at the console's width
    console.print(table)


def print_error(prefix: str, message: object) -> None:
    """One red-prefixed line on stderr; the message is escaped so `[s1,s1]` is not read as markup. A process other
    than rank 0 of a torchrun run prints nothing else, but its errors, prefixed with its rank."""
    if console.quiet:
        import os
        import sys

        sys.stderr.write(f"[rank {os.environ.get('RANK', '?')}] {prefix} {message}\n")
        return
    console.print(f"[bold red]{prefix}[/bold red] {escape(str(message))}", highlight=False, soft_wrap=True)


class RunProgress:
    def __init__(self, label: str, live: bool | None = None):
        self.label = label
        self.live = console.is_terminal if live is None else live
        self._progress: Progress | None = None
        self._task = None
        self._stage = ""
        self._epochs = 0

    def __enter__(self):
        if self.live:
            self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[stats]}"), TimeElapsedColumn(),
                                      TimeRemainingColumn(), console=console, transient=False)
            self._progress.start()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()
        return False

    def start_stage(self, stage: str, epochs: int, steps_per_epoch: int, done: int = 0) -> None:
        """`done`: epochs of this stage already trained (a resumed run)."""
        self._stage, self._epochs = stage, epochs
        name = self.label if stage == "main" else f"{self.label} [{stage}]"
        if self._progress is not None:
            self._task = self._progress.add_task(escape(name), total=epochs * steps_per_epoch,
                                                 completed=done * steps_per_epoch, stats="")
        else:  # a log gets a line now, not only when the first epoch ends
            plural = "epoch" if epochs == 1 else "epochs"
            resumed = f", resumed after epoch {done}" if done else ""
            console.print(escape(f"{name}: {epochs} {plural} of {steps_per_epoch} steps{resumed}"), highlight=False)

    def advance(self) -> None:
        if self._progress is not None:
            self._progress.advance(self._task)

    def end_epoch(self, row: dict) -> None:
        stats = (f"epoch {row['epoch']} loss {row['train_loss']:.3f} train {row['train_acc']:.1f}% "
                 f"test {row['test_acc']:.1f}% {row['images_per_s']:.0f} img/s")
        if self._progress is not None:
            self._progress.update(self._task, stats=stats)
        else:
            stage = "" if self._stage == "main" else f" [{self._stage}]"
            console.print(escape(f"{self.label}{stage} {stats}"), highlight=False)


def print_summary(result: dict) -> None:
    """The small table at the end of a run: teacher and student with their accuracies."""
    table = Table(title=f"{result['method']} on {result['dataset']} (seed {result['seed']})")
    for column in ("role", "model", "accuracy %", "source"):
        table.add_column(column)
    if result.get("teacher"):
        table.add_row("teacher", result["teacher"], _pct(result.get("teacher_acc")), result.get("teacher_source") or "")
    for name, acc in result.get("peer_acc", {}).items():
        table.add_row("peer", name, _pct(acc), "")
    table.add_row("student", result["student"], f"best {_pct(result.get('best_acc'))} / last {_pct(result.get('last_acc'))}",
                  f"best epoch {result.get('best_epoch')}")
    stdout.print(table)
    resumed = f", resumed {result['resumed']}x" if result.get("resumed") else ""
    # soft_wrap: a long path stays on one line, so it can be copied
    stdout.print(f"[dim]{result['status']} in {result['wall_s']:.1f} s{resumed}; results in {escape(result['run_dir'])}[/dim]",
                 soft_wrap=True, highlight=False)


def _pct(value) -> str:
    return "-" if value is None else f"{value:.2f}"
