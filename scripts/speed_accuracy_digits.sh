#!/usr/bin/env bash
# Accuracy with each speed feature on vs the plain run: kd resnet26 -> resnet8 on digits, 30 epochs, seed 0.
# The cache and fusion are exact (equal metrics); channels_last and compile agree to float rounding.
#   scripts/speed_accuracy_digits.sh [results dir, default results/speed_accuracy_digits]
set -euo pipefail
out=${1:-results/speed_accuracy_digits}
common=(method=kd seed=0 skip_completed=false)
kdrun results_dir="$out/plain" "${common[@]}" teacher.cache_outputs=false
kdrun results_dir="$out/cache" "${common[@]}" teacher.cache_outputs=true
kdrun results_dir="$out/channels_last" "${common[@]}" teacher.cache_outputs=false channels_last=true
kdrun results_dir="$out/compile" "${common[@]}" teacher.cache_outputs=false compile=true
kdrun -m results_dir="$out/fused" "${common[@]}" teacher.cache_outputs=false method.T=4,2 fuse=true
kdrun -m results_dir="$out/stacked" "${common[@]}" teacher.cache_outputs=false method.T=4,2 fuse.stack=true
kdrun results_dir="$out/solo_T2" "${common[@]}" teacher.cache_outputs=false method.T=2
python - "$out" <<'PY'
import json, sys
from pathlib import Path
rows = []
for path in sorted(Path(sys.argv[1]).rglob("result.json")):
    if "teachers" in path.parts:
        continue
    r = json.loads(path.read_text())
    variant = path.relative_to(sys.argv[1]).parts[0]
    rows.append((variant, r["T"], r["best_acc"], r["last_acc"], r.get("teacher_cache", "-")))
print("| variant | T | best acc | last acc | teacher cache |\n|---|---:|---:|---:|---|")
for v, t, b, l, c in rows:
    print(f"| {v} | {t:g} | {b:.2f} | {l:.2f} | {c} |")
PY
