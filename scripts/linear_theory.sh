#!/usr/bin/env bash
# Phuong & Lampert 2019, "Towards understanding knowledge distillation": a linear student distilled from a
# linear teacher w*, transfer risk vs n (d = 50) for three angle densities, 3 data seeds each
# (conf/sweep/linear_theory.yaml). Writes the teachers (w* of each data seed as a `linear` checkpoint),
# runs the 54 jobs one after another, then the table and the plot:
#   RESULTS/table.md, RESULTS/risk_vs_n.png (scripts/linear_theory_plot.py).
# Extra arguments go to kdrun, e.g. `scripts/linear_theory.sh results/linear_theory device=cpu`.
set -euo pipefail
results=${1:-results/linear_theory}
shift || true
dim=50
for seed in 0 1 2; do
  python -c "from kdrun.data.linear_teacher import write_teacher_checkpoint as w; w('$results/teachers/w_star_d${dim}_s${seed}.pt', $dim, $seed)"
done
kdrun -m +sweep=linear_theory dataset.dim=$dim results_dir="$results" "$@"
python scripts/linear_theory_plot.py "$results"
