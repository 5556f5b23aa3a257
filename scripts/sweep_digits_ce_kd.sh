#!/usr/bin/env bash
# The README's example sweep: ce and kd x seeds 0,1,2 on the embedded digits set, two jobs side by side
# (joblib launcher), then the comparison table, bar chart and accuracy curves.
set -euo pipefail
results=${1:-results/digits_ce_kd}
kdrun -m hydra/launcher=joblib hydra.launcher.n_jobs=2 method=ce,kd seed=0,1,2 results_dir="$results"
kdrun compare "$results" --plot "$results/compare.png" --curves "$results/curves.png"
kdrun compare "$results" --format markdown --out "$results/compare.md"
