"""Active mixup's learning curve: test accuracy after each round against the queries spent so far, mean +- std
over seeds, for each acquisition, beside random real images at the final budget.

    python scripts/transfer_plot.py results/transfer_digits/active_mixup results/transfer_digits/active_mixup.png
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def curves(root: Path) -> dict[str, list[tuple[list[int], list[float]]]]:
    """Per arm, per seed: (cumulative queries, last-epoch test accuracy) at the end of each round."""
    found: dict[str, list] = {}
    for path in sorted(root.rglob("result.json")):
        record = json.loads(path.read_text())
        if record.get("status") != "completed" or "teachers" in path.parts:
            continue
        with open(path.with_name("metrics.csv")) as f:
            rows = list(csv.DictReader(f))
        if record["transfer"] == "active_mixup":
            last = {}
            for row in rows:
                last[int(row["round"])] = row
            queries = list(np.cumsum(record["queries_per_round"]))
            accuracy = [float(last[r]["test_acc"]) for r in sorted(last)]
            arm = f"active mixup ({record['transfer.acquisition']})"
        else:
            queries, accuracy = [record["teacher_queries"]], [float(rows[-1]["test_acc"])]
            arm = "random real images"
        found.setdefault(arm, []).append((queries, accuracy))
    return found


def main(root: str, out: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, seeds in sorted(curves(Path(root)).items()):
        queries = seeds[0][0]
        acc = np.array([a for _, a in seeds])
        mean, std = acc.mean(0), acc.std(0, ddof=1) if len(acc) > 1 else np.zeros(acc.shape[1])
        ax.errorbar(queries, mean, yerr=std, marker="o", capsize=3, label=f"{arm}, n={len(seeds)}")
    ax.set_xlabel("teacher queries (black box, probabilities)")
    ax.set_ylabel("student test accuracy % (last epoch of the round)")
    ax.set_title("digits, resnet26 -> resnet8")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
