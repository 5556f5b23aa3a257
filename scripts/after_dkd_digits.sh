#!/usr/bin/env bash
# The methods after DKD on digits (resnet26 teacher -> resnet8 student, the default 30 epochs, seeds 0-2), with
# the ce, kd and dkd rows they are compared with and the two modifiers on kd. A check that every method trains
# end to end at its official defaults, not a CIFAR-100 reproduction. MLKD also at its official lr 0.025 (with a
# ce baseline at that lr, for its delta). About 25 minutes on one CPU core.
#   scripts/after_dkd_digits.sh [results dir, default results/after_dkd_digits]
set -euo pipefail
out=${1:-results/after_dkd_digits}
seeds=seed=0,1,2
kdrun -m results_dir="$out" method=ce,kd,dkd,reviewkd,dist,mlkd,ctkd,wttm,ttm,nkd,simkd $seeds
kdrun -m results_dir="$out" method=kd,dkd method.logit_standardize=true $seeds
kdrun -m results_dir="$out" method=kd method.dot=true $seeds
kdrun -m results_dir="$out" method=ce,mlkd optim.lr=0.025 $seeds
# TTM at its official vgg13 -> vgg8 beta 45 does not train on digits (45 x lr 0.05); at beta 4 (wttm's) it does
kdrun -m results_dir="$out" method=ttm method.beta=4 $seeds
kdrun compare "$out" --sort --protocol --format markdown --out "$out/compare.md"
