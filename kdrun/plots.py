"""Figures for `kdrun compare`: a bar chart per configuration and test-accuracy curves from metrics.csv.

Figures are drawn on the Agg canvas directly (no pyplot), so nothing depends on a display or global state.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

METRICS_FILE = "metrics.csv"
METRIC_AXIS = {"best_acc": "best-epoch test accuracy (%)", "last_acc": "last-epoch test accuracy (%)"}
BASELINE_COLOR, METHOD_COLOR = "0.6", "tab:blue"
ACCURACY_MAX = 100.0
MIN_MARGIN = 1.0  # points of accuracy left below the lowest bar end, at the least


def new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save(figure: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=150)


def bar_chart(path: Path, labels: list[str], means: list[float], stds: list[float], ns: list[int], metric: str,
              baseline: list[bool]) -> Figure:
    """Horizontal bars in table order (top first) with std error bars; each bar's value and n on the right."""
    stds = [0.0 if math.isnan(s) else s for s in stds]
    # An accuracy cannot pass 100: neither may its error bar (a std is no bound on a percentage).
    below = [min(s, m) for m, s in zip(means, stds)]
    above = [max(0.0, min(s, ACCURACY_MAX - m)) for m, s in zip(means, stds)]
    start, end = accuracy_axis([m - s for m, s in zip(means, below)], [m + s for m, s in zip(means, above)])
    figure = new_figure(8, 1.2 + 0.45 * len(labels))
    axes = figure.add_subplot()
    rows = range(len(labels))
    colors = [BASELINE_COLOR if is_baseline else METHOD_COLOR for is_baseline in baseline]
    # Bars start at the axis start: a bar drawn from 0 would run off a zoomed axis to the left.
    axes.barh(rows, [m - start for m in means], left=start, xerr=[below, above], color=colors, capsize=3,
              error_kw={"elinewidth": 1})
    axes.set_yticks(rows, labels)
    axes.invert_yaxis()
    axes.set_xlim(start, end)
    # Values as tick labels of a right-hand axis: the layout keeps them inside the figure, even for bars
    # that end at 100, where text beside the bar would fall off the edge.
    values = axes.secondary_yaxis("right")
    values.set_yticks(rows, [value_label(m, s, n) for m, s, n in zip(means, stds, ns)])
    values.tick_params(length=0)
    axes.set_xlabel(f"{METRIC_AXIS[metric]}, mean ± std over seeds" + (f"; axis starts at {start:g}, not 0"
                                                                     if start > 0 else ""))
    if start > 0:
        mark_broken_axis(axes)
    axes.set_title(f"{METRIC_AXIS[metric].removesuffix(' (%)')} ({metric}) per configuration"
                   + (" (grey: no-KD baseline)" if any(baseline) else ""))
    axes.grid(axis="x", alpha=0.3)
    save(figure, path)
    return figure


def accuracy_axis(lows: list[float], highs: list[float]) -> tuple[float, float]:
    """Where the accuracy axis starts and ends. Related runs sit close together, so the axis may start
    above 0, but at least one spread of the data (one point at the least) below the lowest bar end and
    at a round number: then no bar is shorter than that margin, and a 0.1-point difference stays a small
    difference in bar length instead of one bar looking many times the other."""
    lows = [v for v in lows if math.isfinite(v)] or [0.0]
    highs = [v for v in highs if math.isfinite(v)] or [ACCURACY_MAX]
    low, high = min(lows), min(max(highs), ACCURACY_MAX)
    margin = max(high - low, MIN_MARGIN)
    step = 10 ** math.floor(math.log10(margin))
    start = max(0.0, math.floor((low - margin) / step) * step)
    return start, min(ACCURACY_MAX, high + 0.05 * (high - start))


def value_label(mean: float, std: float, n: int) -> str:
    if math.isnan(mean):
        return f"- (n={n})"
    return f"{mean:.2f} ± {std:.2f} (n={n})" if std else f"{mean:.2f} (n={n})"


def mark_broken_axis(axes) -> None:
    """The usual `//` on the left end of the accuracy axis: it does not start at 0."""
    axes.plot([0], [0], transform=axes.transAxes, marker=[(-1, -2), (1, 2)], markersize=10, linestyle="none",
              color="k", clip_on=False)


def curves_chart(path: Path, labels: list[str], run_dirs: list[list[str]]) -> int:
    """One line per configuration: test accuracy per epoch, mean over its seeds, shaded ± std.
    Returns how many configurations had a metrics.csv to draw."""
    figure = new_figure(8, 5)
    axes = figure.add_subplot()
    for label, dirs in zip(labels, run_dirs):
        curves = [curve for run_dir in dirs if (curve := read_curve(Path(run_dir))) is not None]
        if not curves:
            continue
        per_epoch = pd.concat(curves).groupby("epoch")["test_acc"].agg(["mean", "std", "size"])
        line, = axes.plot(per_epoch.index, per_epoch["mean"], marker="." if len(per_epoch) < 30 else None,
                          label=f"{label} (n={len(curves)})")
        if len(curves) > 1:
            axes.fill_between(per_epoch.index, per_epoch["mean"] - per_epoch["std"].fillna(0),
                              per_epoch["mean"] + per_epoch["std"].fillna(0), color=line.get_color(), alpha=0.15)
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel("test accuracy (%)")
    axes.set_title("test accuracy per epoch (mean over seeds, shaded ± std)")
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend(fontsize="small", loc="best")
    else:
        axes.text(0.5, 0.5, "no metrics.csv found for these runs", ha="center", transform=axes.transAxes)
    save(figure, path)
    return len(axes.lines)


def read_curve(run_dir: Path) -> pd.DataFrame | None:
    """Epoch and test accuracy of the run's final stage (preliminary stages train something else)."""
    try:
        rows = pd.read_csv(run_dir / METRICS_FILE)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return None
    if rows.empty or not {"epoch", "test_acc"} <= set(rows.columns):
        return None
    if "stage" in rows.columns:
        rows = rows[rows["stage"] == rows["stage"].iloc[-1]]
    return rows[["epoch", "test_acc"]]
