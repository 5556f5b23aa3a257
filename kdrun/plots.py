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
METRIC_AXIS = {"best_acc": "best test accuracy (%)", "last_acc": "last-epoch test accuracy (%)"}
BASELINE_COLOR, METHOD_COLOR = "0.6", "tab:blue"


def new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save(figure: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=150)


def bar_chart(path: Path, labels: list[str], means: list[float], stds: list[float], metric: str,
              baseline: list[bool]) -> None:
    """Horizontal bars in table order (top first) with std error bars and the value beside each bar."""
    stds = [0.0 if math.isnan(s) else s for s in stds]
    figure = new_figure(8, 1.2 + 0.45 * len(labels))
    axes = figure.add_subplot()
    rows = range(len(labels))
    colors = [BASELINE_COLOR if is_baseline else METHOD_COLOR for is_baseline in baseline]
    axes.barh(rows, means, xerr=stds, color=colors, capsize=3, error_kw={"elinewidth": 1})
    axes.set_yticks(rows, labels)
    axes.invert_yaxis()
    low, high = min(m - s for m, s in zip(means, stds)), max(m + s for m, s in zip(means, stds))
    # Accuracies of related runs sit close together: start the axis near them, leave room for the values.
    pad = max(high - low, 1.0)
    axes.set_xlim(max(0.0, low - pad), high + pad)
    for row, mean, std in zip(rows, means, stds):
        text = f"{mean:.2f} ± {std:.2f}" if std else f"{mean:.2f}"
        axes.text(mean + std + pad * 0.03, row, text, va="center", fontsize="small")
    axes.set_xlabel(f"{METRIC_AXIS[metric]}, mean ± std over seeds")
    axes.set_title(f"{metric} per configuration" + (" (grey: no-KD baseline)" if any(baseline) else ""))
    axes.grid(axis="x", alpha=0.3)
    save(figure, path)


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
