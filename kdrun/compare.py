"""`kdrun compare [DIR ...]`: one row per configuration, seeds aggregated, from every result.json below DIRs.

The pipeline is load and check records (`kdrun.compare_records`) -> select (`--where`) -> set repeats of
one configuration and seed aside -> choose the statistic (`--metric`, else the one the runs record as
`compare_metric`) -> group (detected or `--by` keys) and aggregate with pandas -> render (rich table, CSV,
Markdown, LaTeX) with what was left out listed below, and optionally plot (`kdrun.plots`). The statistic
drives the title, the first accuracy column, the delta, the bold row, `--sort` and the bar chart.
"""
from __future__ import annotations

import argparse
import json
import math
import numbers
import re
import sys
from datetime import datetime
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from kdrun.compare_records import (FINISHED, KEPT, METRICS, RECORDED_METRIC, REPEAT, RUN_DIR, STATISTICS, Unreadable,
                                   identity_keys, is_missing, load_records, recorded_metric, split_repeats)
from kdrun.errors import ConfigError, OneLineParser

FORMATS = ("table", "csv", "markdown", "latex")
# Always shown when they vary, even when another shown key already tells the rows apart.
CORE_KEYS = ("method", "teacher", "student", "dataset")
BASELINE_METHOD = "ce"
# A baseline must have trained the same student the same way, so that the delta measures the teacher alone.
BASELINE_KEYS = ("student", "dataset", "epochs", "batch_size", "lr", "precision")
# `--where` clauses on these also narrow the baseline (`--where seed=0` compares seed 0 with seed 0);
# clauses on method-side keys (method, teacher, T, ...) would exclude the baseline itself.
SHARED_WITH_BASELINE = (*BASELINE_KEYS, "seed", "device")
# Outcomes and bookkeeping: nothing to group by.
OUTCOME_KEYS = ("run_id", "status", "error", "best_acc", "best_epoch", "last_acc", "wall_s", "teacher_acc",
                "teacher_source", "teacher_sha256", "config_hash", "run_dir", "peer_acc", "best_peer", "device",
                "chain", "finished_at", "updated_at", RECORDED_METRIC)
MISSING = "-"
LEFT_OUT_COLUMNS = ("status", "run_id", "method", "student", "seed", "error")
MAX_TABLE_WIDTH = 10_000


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="kdrun compare", description="Aggregate result.json records over seeds.")
    parser.add_argument("dirs", nargs="*", default=["results"], help="directories to search (default: results)")
    parser.add_argument("--where", action="append", default=[], metavar="KEY=A[,B]",
                        help="keep runs whose KEY is one of the values (repeatable; all must hold)")
    parser.add_argument("--by", metavar="KEY[,KEY]", help="group by exactly these keys (seeds still aggregated)")
    parser.add_argument("--metric", choices=METRICS,
                        help="the statistic of the table: its first accuracy column, the delta, the bold row, --sort "
                             "and the plots (default: the one the runs record as compare_metric, else best_acc)")
    parser.add_argument("--sort", action="store_true", help="sort by the metric, best first (default: by keys)")
    parser.add_argument("--format", default="table", choices=FORMATS, help="output format (default: table)")
    parser.add_argument("--out", metavar="FILE", help="write the table to FILE instead of stdout")
    parser.add_argument("--plot", metavar="FILE.png", help="bar chart of the metric per configuration")
    parser.add_argument("--curves", metavar="FILE.png", help="test accuracy per epoch, mean over seeds")
    return parser


def compare_command(args: list[str]) -> int:
    opts = build_parser().parse_args(args)
    for option in ("plot", "curves"):
        check_image_path(option, getattr(opts, option))
    loaded = load_records(opts.dirs)
    runs = loaded.runs
    where = parse_where(opts.where, runs)
    selected = select(runs, where)
    done, repeats = split_repeats(completed(selected))
    keys = parse_by(opts.by, runs) if opts.by else detect_group_keys(done)
    opts.metric, metric_note = (opts.metric, None) if opts.metric else recorded_metric(done)
    baseline_pool, _ = split_repeats(completed(select(runs, [(key, values) for key, values in where
                                                              if key in SHARED_WITH_BASELINE])))
    summary = aggregate(done, keys, opts.metric, baseline_means(baseline_pool, opts.metric))
    if summary.empty and (opts.plot or opts.curves):
        raise ConfigError("nothing to plot: no completed run matches; drop or widen --where")
    summary = sort_summary(summary, keys, opts.metric, opts.sort)
    emit(summary, keys, opts)
    # The table format prints its notes below the table; the file formats keep stdout to the data.
    notes = Console(stderr=not (opts.format == "table" and opts.out is None))
    if metric_note:
        print_lines(notes, [metric_note])
    report_left_out(selected[selected["status"] != "completed"], notes)
    report_repeats(repeats, keys, notes)
    report_unreadable(loaded.unreadable, notes)
    draw_plots(summary, keys, opts)
    return 0


# ---- select -------------------------------------------------------------------------------------------

def completed(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs["status"] == "completed"]


def is_internal(column: str) -> bool:
    """Columns compare adds (where and when a record was found), not keys of the record."""
    return column.startswith("_")


def parse_where(items: list[str], runs: pd.DataFrame) -> list[tuple[str, list[str]]]:
    """`KEY=A,B` clauses as (key, values); every clause must hold, one of its values is enough."""
    allowed = sorted(c for c in runs.columns if not is_internal(c))
    clauses = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--where {item}: expected KEY=VALUE or KEY=A,B, e.g. --where method=kd")
        if key not in allowed:
            raise ConfigError(f"--where {item}: unknown key {key}; allowed: {', '.join(allowed)}")
        wanted = values.split(",")
        if not runs[key].map(lambda v: matches_any(v, wanted)).any():
            present = sorted({format_value(v) for v in runs[key]})
            raise ConfigError(f"--where {item}: no run has {key} in {values}; values present: {', '.join(present)}")
        clauses.append((key, wanted))
    return clauses


def matches_any(value, wanted: list[str]) -> bool:
    return any(matches(value, text) for text in wanted)


def matches(value, text: str) -> bool:
    """`T=4` matches 4.0, `teacher=null` matches runs without a teacher; text is compared case-insensitively."""
    if is_missing(value):
        return text.lower() in ("null", "none", MISSING)
    if str(value).lower() == text.lower():
        return True
    try:
        return float(value) == float(text)
    except (TypeError, ValueError):
        return False


def select(runs: pd.DataFrame, where: list[tuple[str, list[str]]]) -> pd.DataFrame:
    keep = pd.Series(True, index=runs.index)
    for key, wanted in where:
        keep &= runs[key].map(lambda v: matches_any(v, wanted))
    return runs[keep]


def parse_by(text: str, runs: pd.DataFrame) -> list[str]:
    allowed = [c for c in runs.columns if c not in OUTCOME_KEYS and not is_internal(c)]
    keys = [key for key in text.split(",") if key]
    unknown = [key for key in keys if key not in allowed]
    if not keys or unknown:
        raise ConfigError(f"--by {text}: unknown key {', '.join(unknown) or '(none given)'}; "
                          f"allowed: {', '.join(allowed)}")
    return keys


# ---- group and aggregate --------------------------------------------------------------------------------

def detect_group_keys(done: pd.DataFrame) -> list[str]:
    """Identity keys that vary (a missing value counts as a value), less those that only repeat what the
    other shown keys already say (T and alpha that only tell kd from ce); core keys always stay."""
    varying = [key for key in identity_keys(done.columns) if done[key].nunique(dropna=False) > 1]
    keys = list(varying)
    for key in reversed(varying):
        rest = [k for k in keys if k != key]
        if key not in CORE_KEYS and rest and count_groups(done, rest) == count_groups(done, keys):
            keys = rest
    return keys or [key for key in CORE_KEYS if key in done.columns and done[key].notna().any()]


def count_groups(frame: pd.DataFrame, keys: list[str]) -> int:
    return frame.groupby(keys, dropna=False).ngroups


def baseline_means(runs: pd.DataFrame, metric: str) -> dict[str, float]:
    """Mean metric of the completed baseline runs in `runs`, by their training recipe."""
    baseline = runs[(runs["status"] == "completed") & (runs["method"] == BASELINE_METHOD)]
    return baseline.groupby(recipe_column(baseline))[metric].mean().to_dict() if len(baseline) else {}


def recipe_column(runs: pd.DataFrame) -> pd.Series:
    keys = [key for key in BASELINE_KEYS if key in runs.columns]
    return runs[keys].apply(lambda row: json.dumps([format_value(v) for v in row]), axis=1)


def aggregate(done: pd.DataFrame, keys: list[str], metric: str, baselines: dict[str, float]) -> pd.DataFrame:
    """One row per configuration: n, mean and sample std (ddof=1) of best and last accuracy (`metric` first),
    mean teacher accuracy, and the delta of the mean `metric` to the baseline trained with the same recipe."""
    columns = [*keys, "n", *(f"{m}_{stat}" for m in metric_order(metric) for stat in ("mean", "std")),
               "teacher_acc_mean", f"delta_{metric}", RUN_DIR]
    if done.empty:
        return pd.DataFrame(columns=columns)
    frame = done.assign(_recipe=recipe_column(done))
    summary = frame.groupby(keys, dropna=False, sort=False).agg(
        n=("best_acc", "size"),
        best_acc_mean=("best_acc", "mean"), best_acc_std=("best_acc", "std"),
        last_acc_mean=("last_acc", "mean"), last_acc_std=("last_acc", "std"),
        teacher_acc_mean=("teacher_acc", "mean"),
        _recipe=("_recipe", lambda s: s.iloc[0] if s.nunique() == 1 else None),
        **{RUN_DIR: (RUN_DIR, list)},
    ).reset_index()
    baseline = summary["_recipe"].map(lambda recipe: baselines.get(recipe, math.nan))
    summary[f"delta_{metric}"] = summary[f"{metric}_mean"] - baseline.astype(float)
    return summary[columns]


def metric_order(metric: str) -> list[str]:
    """The accuracy statistics, the table's own first."""
    return [metric, *(m for m in METRICS if m != metric)]


def sort_summary(summary: pd.DataFrame, keys: list[str], metric: str, by_metric: bool) -> pd.DataFrame:
    if by_metric:
        return summary.sort_values(f"{metric}_mean", ascending=False, kind="stable").reset_index(drop=True)
    if summary.empty:
        return summary
    return summary.sort_values(keys, key=lambda column: column.map(sort_token), kind="stable").reset_index(drop=True)


def sort_token(value) -> tuple:
    """Numbers before text, missing values last (mixed columns sort without type errors); text in natural
    order, so that resnet8 comes before resnet14."""
    if is_missing(value):
        return (2, ())
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return (0, (float(value),))
    return (1, tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(value))))


# ---- render ---------------------------------------------------------------------------------------------

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
        Console(stderr=True).print(f"wrote {path}", highlight=False)
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
                          f"{metric} minus that of {BASELINE_METHOD} with the same {', '.join(BASELINE_KEYS)}; "
                          f"bold: the best mean {metric}")
    for index, column in enumerate(shown.columns):
        table.add_column(column, justify="left" if index < len(keys) else "right", no_wrap=True)
    best = summary[f"{metric}_mean"].idxmax() if summary[f"{metric}_mean"].notna().any() else None
    for index, row in shown.iterrows():
        table.add_row(*row, style="bold" if index == best else None)
    return table


def print_unfolded(console: Console, table: Table) -> None:
    """Print the table as wide as its cells need, past the console's width if need be: a value folded or
    cut to fit (`94.00 ±` over `1.00`, `wide_res…`) is misread, a line the terminal wraps is still whole.
    The caption wraps to the table's width."""
    natural = Measurement.get(console, console.options.update(max_width=MAX_TABLE_WIDTH), table).maximum
    console.width = max(console.width, natural)  # print(width=...) would be capped at the console's width
    console.print(table)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def to_markdown(shown: pd.DataFrame, numeric_from: int) -> str:
    """GitHub Markdown; numbers right-aligned (pandas' to_markdown would need `tabulate`)."""
    def line(cells) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    rule = ["---" if index < numeric_from else "---:" for index in range(len(shown.columns))]
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
        # Only the free-text error may fold; names and seeds stay whole.
        table.add_column(column, no_wrap=column != "error", overflow="fold")
    for _, run in left_out.iterrows():
        table.add_row(*(format_value(run.get(column)) for column in LEFT_OUT_COLUMNS))
    console.print(table)


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
    """`kd, resnet26, T=4`: names of models and methods bare, hyperparameters as key=value, missing skipped."""
    parts = [format_value(row[key]) if key in CORE_KEYS else f"{key}={format_value(row[key])}"
             for key in keys if not is_missing(row[key])]
    return ", ".join(parts) or "all runs"
