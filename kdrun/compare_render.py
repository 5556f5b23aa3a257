"""Rendering for `kdrun compare`: the summary as a rich table, CSV, Markdown or LaTeX, the runs left out of
the means (failed, unfinished, repeats, unreadable files) and the figures."""
from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from kdrun.compare_records import (BASELINE_KEYS, BASELINE_METHOD, CORE_KEYS, FINISHED, KEPT, REPEAT, RUN_DIR,
                                   STATISTICS, Unreadable, is_missing, metric_order)
from kdrun.compare_protocol import PROTOCOL_COLUMNS
from kdrun.errors import ConfigError
from kdrun.progress import print_unfolded

MISSING = "-"
LEFT_OUT_COLUMNS = ("status", "run_id", "method", "student", "seed", "error")


def format_value(value) -> str:
    if is_missing(value):
        return MISSING
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def format_mean_std(mean: float, std: float) -> str:
    if is_missing(mean):
        return MISSING
    return f"{mean:.2f}" if is_missing(std) else f"{mean:.2f} ± {std:.2f}"


def format_number(value: float, signed: bool = False) -> str:
    return MISSING if is_missing(value) else (f"{value:+.2f}" if signed else f"{value:.2f}")


def delta_header(metric: str, delta: str = "Δ") -> str:
    return f"{delta} {metric.removesuffix('_acc')} vs {BASELINE_METHOD}"


def display_frame(summary: pd.DataFrame, keys: list[str], metric: str) -> pd.DataFrame:
    """The summary as text cells, as the table, Markdown and LaTeX show it."""
    shown = pd.DataFrame({key: summary[key].map(format_value) for key in keys})
    shown["n"] = summary["n"].astype(int).astype(str)
    for name in metric_order(metric):  # best_acc -> "best acc"
        shown[name.replace("_", " ")] = [format_mean_std(m, s) for m, s in
                                         zip(summary[f"{name}_mean"], summary[f"{name}_std"])]
    shown["teacher acc"] = summary["teacher_acc_mean"].map(format_number)
    shown[delta_header(metric)] = summary[f"delta_{metric}"].map(lambda v: format_number(v, True))
    for column in summary.columns:
        if column.startswith("protocol."):
            shown[column.removeprefix("protocol.")] = summary[column]
    return shown


def emit(summary: pd.DataFrame, keys: list[str], opts: argparse.Namespace) -> None:
    if opts.format == "table":
        text = None
    elif opts.format == "csv":
        text = summary.drop(columns=RUN_DIR).to_csv(index=False)
    elif opts.format == "markdown":
        text = to_markdown(display_frame(summary, keys, opts.metric), numeric_from=len(keys))
    else:
        text = to_latex(display_frame(summary, keys, opts.metric), opts.metric, numeric_from=len(keys))
    if opts.out:
        path = Path(opts.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        if text is None:
            with path.open("w") as handle:
                print_unfolded(Console(file=handle, width=200, color_system=None),
                               rich_table(summary, keys, opts.metric))
        else:
            path.write_text(text)
        Console(stderr=True).print(f"wrote {path}", highlight=False, soft_wrap=True)  # a path stays one line
    elif text is None and summary.empty:
        Console().print("no completed run matches; failed and unfinished runs are listed below", highlight=False)
    elif text is None:
        print_unfolded(Console(), rich_table(summary, keys, opts.metric))
    else:
        sys.stdout.write(text)


def rich_table(summary: pd.DataFrame, keys: list[str], metric: str) -> Table:
    shown = display_frame(summary, keys, metric)
    runs = int(summary["n"].sum())
    table = Table(title=f"kdrun compare: {STATISTICS[metric]} ({metric}), {plural(len(summary), 'configuration')}, "
                        f"{plural(runs, 'completed run')}",
                  caption=f"mean ± sample std (ddof=1) over seeds; n counts each seed once (of repeats, runs with "
                          f"the same configuration and seed, the newest is kept); {delta_header(metric)}: mean "
                          f"{metric} minus that of {BASELINE_METHOD} with the same {', '.join(BASELINE_KEYS[:-1])} and "
                          f"{BASELINE_KEYS[-1]}, and the same student, dataset and transfer options; "
                          f"bold: the best mean {metric}")
    protocol = [c.removeprefix("protocol.") for c in summary.columns if c.startswith("protocol.")]
    for index, column in enumerate(shown.columns):
        text = index < len(keys) or column in protocol
        table.add_column(column, justify="left" if text else "right", no_wrap=True)
    best = summary[f"{metric}_mean"].idxmax() if summary[f"{metric}_mean"].notna().any() else None
    for index, row in shown.iterrows():
        table.add_row(*row, style="bold" if index == best else None)
    return table


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def to_markdown(shown: pd.DataFrame, numeric_from: int) -> str:
    """GitHub Markdown; numbers right-aligned (pandas' to_markdown would need `tabulate`), the protocol's words
    left-aligned."""
    def line(cells) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    words = set(PROTOCOL_COLUMNS) - {"epochs", "batch"}
    rule = ["---" if index < numeric_from or column in words else "---:" for index, column in enumerate(shown.columns)]
    return "\n".join([line(shown.columns), line(rule), *(line(row) for row in shown.itertuples(index=False))]) + "\n"


def to_latex(shown: pd.DataFrame, metric: str, numeric_from: int) -> str:
    """A booktabs tabular; Δ is spelled out and ± set as $\\pm$ because pdflatex's default text encoding has
    neither (escaping first, so that the math stays math)."""
    align = "l" * numeric_from + "r" * (len(shown.columns) - numeric_from)
    spelled = shown.rename(columns={delta_header(metric): delta_header(metric, delta="delta")})
    return spelled.to_latex(index=False, escape=True, column_format=align).replace("±", r"$\pm$")


def report_left_out(left_out: pd.DataFrame, console: Console) -> None:
    """Failed and unfinished runs are listed apart; they never enter a mean."""
    if left_out.empty:
        return
    counts = ", ".join(f"{n} {status}" for status, n in left_out["status"].value_counts().sort_index().items())
    table = Table(title=f"left out of the means: {counts}")
    for column in LEFT_OUT_COLUMNS:
        table.add_column(column, no_wrap=True)  # a narrow console must not squeeze the error to one letter
    for _, run in left_out.iterrows():
        table.add_row(*(format_value(run.get(column)) for column in LEFT_OUT_COLUMNS))
    print_unfolded(console, table)


def report_repeats(repeats: pd.DataFrame, keys: list[str], console: Console) -> None:
    """Runs of one configuration and seed, newest (the one in the mean) first, with their directories."""
    if repeats.empty:
        return
    groups = [group for _, group in repeats.groupby(REPEAT, sort=False)]
    counts = ", ".join(f"{len(group)} of {config_label(group.iloc[0], keys)}, seed "
                       f"{format_value(group.iloc[0].get('seed'))}" for group in groups)
    lines = [f"repeats (same configuration and seed; the newest is kept): {counts}"]
    for group in groups:
        lines += [f"  {'kept' if run[KEPT] else 'left out':8}  {format_time(run[FINISHED])}  {run[RUN_DIR]}"
                  for _, run in group.iterrows()]
    print_lines(console, lines)


def report_unreadable(unreadable: list[Unreadable], console: Console) -> None:
    """Files that are no usable run record: listed, so that a table with fewer runs is never a surprise."""
    if not unreadable:
        return
    lines = [f"unreadable result.json, left out: {plural(len(unreadable), 'file')}"]
    lines += [f"  {file.path}: {file.reason}" for file in unreadable]
    print_lines(console, lines)


def print_lines(console: Console, lines: list[str]) -> None:
    """Whole lines, never folded (paths are copied from them), no markup read into `[...]` in paths."""
    for line in lines:
        console.print(line, soft_wrap=True, markup=False, highlight=False)


def format_time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).isoformat(sep=" ", timespec="seconds")


# ---- plots ----------------------------------------------------------------------------------------------

def check_image_path(option: str, path: str | None) -> None:
    suffix = Path(path).suffix.lower().lstrip(".") if path else "png"
    if suffix not in ("png", "pdf", "svg"):
        raise ConfigError(f"--{option} {path}: unknown image type .{suffix}; allowed: .png, .pdf, .svg")


def draw_plots(summary: pd.DataFrame, keys: list[str], opts: argparse.Namespace) -> None:
    if not (opts.plot or opts.curves):
        return
    from kdrun import plots

    labels = [config_label(row, keys) for _, row in summary.iterrows()]
    if opts.plot:
        baseline = (summary["method"] == BASELINE_METHOD).tolist() if "method" in keys else [False] * len(labels)
        plots.bar_chart(Path(opts.plot), labels, summary[f"{opts.metric}_mean"].tolist(),
                        summary[f"{opts.metric}_std"].tolist(), summary["n"].astype(int).tolist(), opts.metric,
                        baseline)
    if opts.curves:
        drawn = plots.curves_chart(Path(opts.curves), labels, summary[RUN_DIR].tolist())
        if drawn < len(labels):
            Console(stderr=True).print(f"--curves: {len(labels) - drawn} of {len(labels)} configurations have no "
                                       f"readable metrics.csv", highlight=False)


def config_label(row: pd.Series, keys: list[str]) -> str:
    """`kd, resnet26, T=4`: names of models and methods bare, hyperparameters as key=value, missing values
    skipped unless nothing else tells the row apart (`method.kd_until_epoch=-`)."""
    def part(key: str) -> str:
        return format_value(row[key]) if key in CORE_KEYS else f"{key}={format_value(row[key])}"

    parts = [part(key) for key in keys if not is_missing(row[key])]
    return ", ".join(parts or [part(key) for key in keys]) or "all runs"
