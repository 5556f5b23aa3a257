"""Table and plot of the linear teacher-student sweep (Phuong & Lampert 2019; `conf/sweep/linear_theory.yaml`).

    python scripts/linear_theory_plot.py [RESULTS_DIR]      # default results/linear_theory

Reads every completed `linear_teacher` run below RESULTS_DIR (kdrun's own record checks: unreadable files
and repeats of one configuration are left out as `kdrun compare` leaves them out), and per run:

- the transfer risk `P(sign(w^T x) != sign(w*^T x))` on the test split, which is `100 - last_acc` since the
  labels are the teacher's;
- from the student's checkpoint and the regenerated data: cos(w, w*), cos(w, P w*) with P the projection onto
  the span of the run's training inputs (the paper's limit of gradient descent from 0), and the risk of
  P w* itself (what the student tends to with unlimited steps).

It writes RESULTS_DIR/table.md (one row per angle density and n, mean ± sample std over the data seeds) and
RESULTS_DIR/risk_vs_n.png. `kdrun compare RESULTS_DIR --by dataset.angle_density,dataset.n_train` gives the
accuracies alone; the weight-space columns need the checkpoints, hence this script.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from kdrun.checkpoint import load_checkpoint, model_state
from kdrun.compare_records import KEPT, RUN_DIR, load_records, split_repeats
from kdrun.data.linear_teacher import DENSITIES, load_linear_teacher, teacher_vector

DATASET = "linear_teacher"
COLORS = {"isotropic": "tab:red", "uniform": "tab:blue", "concentrated": "tab:green"}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norm) if norm > 0 else 0.0


def projection_onto_span(train_x: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The orthogonal projection of `v` onto the span of the rows of `train_x` (n x d)."""
    q, _ = np.linalg.qr(train_x.T.astype(np.float64))  # d x min(n, d), orthonormal columns
    return q @ (q.T @ v)


def risk_percent(w: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Percentage of test points on which sign(w^T x) disagrees with the teacher's label (argmax of the
    linear model's logits [-z/2, z/2]: class 1 when z > 0)."""
    return 100.0 * float(np.mean((test_x @ w > 0).astype(np.int64) != test_y))


def measure(run_dir: Path, record: dict) -> dict:
    cfg = OmegaConf.load(run_dir / "config.yaml")
    data_cfg = cfg.dataset
    data = load_linear_teacher(data_cfg)
    dim = int(data_cfg.dim)
    train_x = data.train_images.view(len(data.train_images), dim).double().numpy()
    test_x = data.test_images.view(len(data.test_images), dim).double().numpy()
    test_y = data.test_labels.numpy()
    w_star = teacher_vector(dim, int(data_cfg.seed))
    w = model_state(load_checkpoint(run_dir / "checkpoint.pt"))["head.weight"].double().numpy()
    projected = projection_onto_span(train_x, w_star)
    return {"angle_density": str(data_cfg.angle_density), "n": int(data_cfg.n_train), "d": dim,
            "data_seed": int(data_cfg.seed), "kappa": float(data_cfg.kappa), "epochs": int(cfg.epochs),
            "risk": 100.0 - float(record["last_acc"]), "risk_recomputed": risk_percent(w, test_x, test_y),
            "cos_w_star": cosine(w, w_star), "cos_projection": cosine(w, projected),
            "projection_risk": risk_percent(projected, test_x, test_y), "wall_s": float(record.get("wall_s") or 0)}


def collect(results: Path) -> pd.DataFrame:
    loaded = load_records([str(results)])
    for bad in loaded.unreadable:
        print(f"left out: {bad.path}: {bad.reason}", file=sys.stderr)
    runs = loaded.runs
    runs = runs[(runs["status"] == "completed") & (runs["dataset"] == DATASET)]
    done, repeats = split_repeats(runs)
    if len(repeats):
        print(f"left out {int((~repeats[KEPT].astype(bool)).sum())} repeats (same configuration and seed)",
              file=sys.stderr)
    rows = [measure(Path(run[RUN_DIR]), run.to_dict()) for _, run in done.iterrows()]
    if not rows:
        raise SystemExit(f"no completed {DATASET} run below {results}")
    return pd.DataFrame(rows)


def mean_std(values: pd.Series, digits: int) -> str:
    mean, std = values.mean(), values.std()
    return f"{mean:.{digits}f}" if len(values) < 2 or math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
    order = {name: i for i, name in enumerate(DENSITIES)}
    groups = frame.groupby(["angle_density", "n"], sort=False)
    summary = groups.agg(d=("d", "first"), seeds=("data_seed", "nunique"), risk_mean=("risk", "mean"),
                         risk_std=("risk", "std"), projection_risk_mean=("projection_risk", "mean")).reset_index()
    for column, source, digits in (("risk", "risk", 2), ("projection risk", "projection_risk", 2),
                                   ("cos(w, w*)", "cos_w_star", 4), ("cos(w, P w*)", "cos_projection", 5)):
        summary[column] = [mean_std(group[source], digits) for _, group in groups]
    summary["_order"] = summary["angle_density"].map(order)
    return summary.sort_values(["_order", "n"]).drop(columns="_order").reset_index(drop=True)


def markdown(summary: pd.DataFrame) -> str:
    header = ["angle density", "n", "n/d", "data seeds", "transfer risk %", "risk of P w* %", "cos(w, w*)",
              "cos(w, P w*)"]
    lines = ["| " + " | ".join(header) + " |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for _, row in summary.iterrows():
        cells = [row["angle_density"], str(row["n"]), f"{row['n'] / row['d']:g}", str(row["seeds"]), row["risk"],
                 row["projection risk"], row["cos(w, w*)"], row["cos(w, P w*)"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: pd.DataFrame, path: Path) -> None:
    figure = Figure(figsize=(7, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    floor = 0.005  # risks of 0 drawn at the floor of the log axis (half the test split's resolution)
    for density in [d for d in DENSITIES if d in set(summary["angle_density"])]:
        part = summary[summary["angle_density"] == density]
        color = COLORS.get(density)
        measured = np.maximum(part["risk_mean"].to_numpy(), floor)
        spread = np.nan_to_num(part["risk_std"].to_numpy())
        axes.errorbar(part["n"], measured, yerr=[np.minimum(spread, measured - floor), spread], marker="o",
                      capsize=3, color=color, label=f"{density}: student after training")
        axes.plot(part["n"], np.maximum(part["projection_risk_mean"].to_numpy(), floor), linestyle="--",
                  color=color, alpha=0.6, label=f"{density}: projection P w* (theory)")
    d = int(summary["d"].iloc[0])
    axes.axvline(d, color="0.5", linewidth=1, linestyle=":")
    axes.text(d, 0.97, " n = d", transform=axes.get_xaxis_transform(), va="top", color="0.4")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_ylim(floor * 0.8, 100)
    axes.set_xlabel(f"training points n (d = {d})")
    axes.set_ylabel(f"transfer risk % (0 drawn at {floor:g})")
    axes.set_title("Linear teacher-student KD (Phuong & Lampert 2019): risk vs n, mean ± std over data seeds",
                   fontsize=9)
    axes.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=150)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", default="results/linear_theory", help="the sweep's results_dir")
    opts = parser.parse_args(argv)
    results = Path(opts.results)
    torch.set_num_threads(1)
    frame = collect(results)
    summary = summarise(frame)
    table = markdown(summary)
    (results / "table.md").write_text(table)
    plot(summary, results / "risk_vs_n.png")
    sys.stdout.write(table)
    sys.stdout.flush()
    print(f"wrote {results / 'table.md'} and {results / 'risk_vs_n.png'} from {len(frame)} runs "
          f"(max |recorded - recomputed risk| {np.max(np.abs(frame['risk'] - frame['risk_recomputed'])):.3f} "
          "points)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
