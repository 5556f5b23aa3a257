"""Markdown tables of the transfer-set experiments (scripts/transfer_digits.sh, scripts/transfer_label_free.sh):
mean +- sample std over seeds of what each experiment measures, read from the runs' result.json files.

    python scripts/transfer_tables.py results/transfer_digits results/transfer_label_free
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def records(root: Path) -> list[dict]:
    found = []
    for path in sorted(root.rglob("result.json")):
        if "teachers" in path.parts:
            continue
        record = json.loads(path.read_text())
        if record.get("status") == "completed":
            found.append(record)
    return found


def stat(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f} (n=1)"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def group(runs: list[dict], key) -> dict:
    groups: dict = {}
    for run in runs:
        groups.setdefault(key(run), []).append(run)
    return groups


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def omitted_classes(runs: list[dict]) -> str | None:
    runs = [r for r in runs if r.get("transfer") == "omit_classes"]
    if not runs:
        return None
    rows = []
    for method, group_runs in sorted(group(runs, lambda r: r["method"]).items()):
        rows.append([method, str(len(group_runs)), stat(r["acc_before_shift"] for r in group_runs),
                     stat(r["acc_after_shift"] for r in group_runs),
                     stat(r["omitted_acc_before_shift"][0] for r in group_runs),
                     stat(r["omitted_acc_after_shift"][0] for r in group_runs),
                     stat(r["bias_shift"] for r in group_runs), stat(r["teacher_acc"] for r in group_runs)])
    return table(["student", "seeds", "test acc %", "after shift", "3s acc %", "3s after shift", "shift",
                  "teacher %"], rows)


def label_free(runs: list[dict]) -> str | None:
    runs = [r for r in runs if r.get("dataset") == "fashion_mnist"]
    if not runs:
        return None
    rows = []
    for (transfer, divergence), group_runs in sorted(group(runs, lambda r: (r["transfer"], r.get(
            "transfer.divergence") or "-")).items()):
        first = group_runs[0]
        labelled = "CE + KD" if transfer == "labelled" else f"no label ({divergence})"
        rows.append([transfer, labelled, str(first["transfer_size"]), str(first["epochs"]), str(len(group_runs)),
                     stat(r["best_acc"] for r in group_runs), stat(r["last_acc"] for r in group_runs),
                     stat(r["teacher_acc"] for r in group_runs)])
    return table(["transfer", "student's loss", "images", "epochs", "seeds", "best %", "last %", "teacher %"], rows)


def mixup_arm(run: dict) -> str:
    if run["transfer"] == "active_mixup":
        return f"active mixup, {run['transfer.acquisition']}"
    return "real images, random"


def active_mixup(runs: list[dict]) -> str | None:
    runs = [r for r in runs if r.get("teacher.access") == "probabilities"]
    if not runs:
        return None
    rows = []
    for arm, group_runs in sorted(group(runs, mixup_arm).items()):
        rows.append([arm, str(group_runs[0]["teacher_queries"]), str(len(group_runs)),
                     stat(r["best_acc"] for r in group_runs), stat(r["last_acc"] for r in group_runs),
                     stat(r["teacher_acc"] for r in group_runs)])
    return table(["transfer set", "queries", "seeds", "best %", "last %", "teacher %"], rows)


def bss(runs: list[dict]) -> str | None:
    runs = [r for r in runs if r.get("transfer") == "labelled" and r["method"] in ("kd", "bss")
            and r.get("dataset") == "digits"]
    if not runs:
        return None
    rows = [[method, str(len(g)), stat(r["best_acc"] for r in g), stat(r["last_acc"] for r in g),
             stat(r["teacher_acc"] for r in g)]
            for method, g in sorted(group(runs, lambda r: r["method"]).items())]
    return table(["method", "seeds", "best %", "last %", "teacher %"], rows)


def main(dirs: list[str]) -> None:
    runs = [r for d in dirs for r in records(Path(d))]
    for title, make in (("Omitted class (Hinton)", omitted_classes), ("Label-free vs labelled", label_free),
                        ("Active mixup", active_mixup), ("BSS vs KD", bss)):
        text = make(runs)
        if text:
            print(f"### {title}\n\n{text}\n")


if __name__ == "__main__":
    main(sys.argv[1:] or ["results"])
