"""Markdown table of the data-free experiment (scripts/datafree_digits.sh): each student's test accuracy, mean
+- sample std over seeds, by what it learnt from; and the sample grids of the synthetic sets, copied beside it.

    python scripts/datafree_tables.py results/datafree_digits [grids folder]
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from transfer_tables import group, records, stat, table


def arm(run: dict) -> str:
    if run["transfer"] == "synthetic":
        name = f"synthetic {run['transfer.synth']}"
        return f"{name}, int8 copy of the teacher" if run.get("student.quantize") else name
    if run["transfer"] == "label_free":
        return "real training split, no labels"
    return "real training split, labels (CE)"


def main(root: str, grids: str | None = None) -> None:
    runs = records(Path(root))
    rows = []
    for name, g in sorted(group(runs, arm).items()):
        first = g[0]
        quantized = stat(r.get("quantized_acc") for r in g) if first.get("student.quantize") else "-"
        synth_s = first.get("synthetic_wall_s")
        rows.append([name, first["student"], str(first["transfer_size"]), str(len(g)),
                     stat(r["best_acc"] for r in g), stat(r["last_acc"] for r in g), quantized,
                     stat(r.get("teacher_acc") for r in g),
                     "-" if synth_s is None else f"{first['synthetic_images'] / synth_s:.1f}"])
    print(table(["student learnt from", "student", "images", "seeds", "best %", "last %", "int8 %", "teacher %",
                 "generated images/s"], rows))
    sizes = [r for r in runs if r.get("student.quantize")]
    if sizes:
        r = sizes[0]
        print(f"\nint8 student: {r['student_weight_bytes']:,} weight bytes against {r['student_weight_bytes_fp32']:,} "
              f"in fp32 ({r['student_weight_bytes_fp32'] / r['student_weight_bytes']:.1f}x); the .pt2 file "
              f"{r['student_size_bytes']:,} against {r['student_size_bytes_fp32']:,} bytes")
    if grids:
        Path(grids).mkdir(parents=True, exist_ok=True)
        for r in runs:
            if r.get("synthetic_grid") and Path(r["synthetic_grid"]).is_file():
                shutil.copyfile(r["synthetic_grid"], Path(grids) / f"{r['transfer.synth']}.png")


if __name__ == "__main__":
    main(*sys.argv[1:3])
