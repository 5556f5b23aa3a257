#!/usr/bin/env bash
# The transfer-set experiments on digits (resnet26 teacher -> resnet8 student, 30 epochs, seeds 0-2):
#   1. Hinton's omitted class: no 3 in the transfer set; KD (T=20) and a CE student on the same set, with the
#      bias shift chosen on a held-out validation split;
#   3. Active mixup vs random mixups vs random real images, all at 800 black-box queries (T=1, no CE:
#      the official loss is the soft cross-entropy to the teacher's probabilities);
#   4. BSS vs KD on the same pair.
# About 25 minutes on one CPU core. Tables: scripts/transfer_tables.py; plot: scripts/transfer_plot.py.
#   scripts/transfer_digits.sh [results dir, default results/transfer_digits]
set -euo pipefail
out=${1:-results/transfer_digits}
seeds=seed=0,1,2
kdrun -m results_dir="$out/omit_classes" transfer=omit_classes 'transfer.classes=[3]' transfer.bias_shift=auto \
  method=kd method.T=20 $seeds
kdrun -m results_dir="$out/omit_classes" transfer=omit_classes 'transfer.classes=[3]' transfer.bias_shift=auto \
  method=ce $seeds
box=(teacher.access=probabilities method=kd method.alpha=1 method.T=1)
kdrun -m results_dir="$out/active_mixup" "${box[@]}" transfer=active_mixup \
  transfer.acquisition=least_confident,random $seeds
kdrun -m results_dir="$out/active_mixup" "${box[@]}" transfer=label_free transfer.divergence=kl \
  teacher.query_budget=800 $seeds
kdrun -m results_dir="$out/bss" method=kd,bss $seeds
