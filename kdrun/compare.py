"""`kdrun compare [DIR ...]`: one row per configuration, seeds aggregated, from every result.json below DIRs.

The pipeline is load and check records (`kdrun.compare_records`) -> select (`--where`) -> set repeats of
one configuration and seed aside -> choose the statistic (`--metric`, else the one the runs record as
`compare_metric`) -> group (detected or `--by` keys) and aggregate with pandas -> render (rich table, CSV,
Markdown, LaTeX) with what was left out listed below, and optionally plot (`kdrun.plots`). The statistic
drives the title, the first accuracy column, the delta, the bold row, `--sort` and the bar chart.
"""
from __future__ import annotations

import json
import math
import numbers
import re

import pandas as pd
from rich.console import Console

from kdrun.compare_protocol import differing_facts, protocol_columns
from kdrun.compare_records import (BASELINE_KEYS, BASELINE_METHOD, CORE_KEYS, METRICS, RECORDED_METRIC, RUN_DIR,
                                   identity_keys, is_missing, load_records, metric_order, recorded_metric,
                                   split_repeats)
from kdrun.compare_render import (MISSING, check_image_path, draw_plots, emit, format_value, print_lines,
                                  report_left_out, report_repeats, report_unreadable)
from kdrun.errors import ConfigError, OneLineParser
from kdrun.modifier_keys import DEPENDENT_COLUMNS

FORMATS = ("table", "csv", "markdown", "latex")
PROTOCOL_PREFIX = "protocol."  # the summary's protocol columns (CSV headers); the table shows the bare names
# `--where` clauses on these also narrow the baseline (`--where seed=0` compares seed 0 with seed 0);
# clauses on method-side keys (method, teacher, T, ...) would exclude the baseline itself.
SHARED_WITH_BASELINE = (*BASELINE_KEYS, "seed", "device")
# Outcomes and bookkeeping: nothing to group by.
OUTCOME_KEYS = ("run_id", "status", "error", "best_acc", "best_epoch", "last_acc", "wall_s", "teacher_acc",
                "teacher_source", "teacher_sha256", "config_hash", "run_dir", "peer_acc", "best_peer", "device",
                "chain", "finished_at", "updated_at", RECORDED_METRIC)


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
    parser.add_argument("--protocol", action="store_true",
                        help="add the protocol columns per row: augmentation, epochs, batch, the statistic the runs' "
                             "recipe reports, and the method keys changed from their defaults")
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
    protocol = protocol_columns(done, keys)
    if opts.protocol:
        summary = pd.concat([summary, protocol.add_prefix(PROTOCOL_PREFIX)], axis=1)
    if summary.empty and (opts.plot or opts.curves):
        raise ConfigError("nothing to plot: no completed run matches; drop or widen --where")
    summary = sort_summary(summary, keys, opts.metric, opts.sort)
    emit(summary, keys, opts)
    # The table format prints its notes below the table; the file formats keep stdout to the data.
    notes = Console(stderr=not (opts.format == "table" and opts.out is None))
    if metric_note:
        print_lines(notes, [metric_note])
    # the statistic's own note (metric_note) already says when the runs record different ones
    differing = [c for c in differing_facts(protocol) if c != "changed keys" and not (metric_note and c == "statistic")]
    if differing and not opts.protocol:
        print_lines(notes, [f"the rows differ in protocol ({', '.join(differing)}); kdrun compare --protocol shows "
                            "each row's"])
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
    # a modifier's own keys (LS's base_T) go first, so that its switch names the configuration
    for key in sorted(reversed(varying), key=lambda k: k not in DEPENDENT_COLUMNS):
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
    """The training recipe a baseline must share: BASELINE_KEYS plus the student's, the dataset's and the
    transfer set's options (a no-residual student is compared with the no-residual baseline, a student of
    a transfer set without the 3s with a CE student of that set)."""
    options = sorted(c for c in runs.columns if c == "transfer" or c.startswith(("student.", "dataset.", "transfer.")))
    keys = [key for key in (*BASELINE_KEYS, *options) if key in runs.columns]
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
