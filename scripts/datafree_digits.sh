#!/usr/bin/env bash
# Data-free distillation on digits: a resnet26 teacher (30 epochs on the real training split), then resnet8
# students trained for 30 epochs with KD and no label (method.alpha=1) on 512 images synthesised from the
# teacher by each synthesis (200 Adam steps per batch of 128, scaled down from the official 2000 steps of 256),
# against the same student distilled on the real training split without labels, and the CE baseline on the
# real labels; seeds 0-2. Each synthetic set is generated once and shared by the seeds (the cache). About
# 30 minutes on one CPU core.
#   scripts/datafree_digits.sh [results dir, default results/datafree_digits]
set -euo pipefail
out=${1:-results/datafree_digits}
gen=(transfer.images=512 transfer.iterations=200 transfer.batch_size=128)
kdrun -m results_dir="$out" transfer=synthetic "${gen[@]}" transfer.synth=gaussian,inception,bn_stats,deepinversion \
  method=kd method.alpha=1 seed=0,1,2
kdrun -m results_dir="$out" transfer=label_free transfer.divergence=kl method=kd method.alpha=1 seed=0,1,2
kdrun -m results_dir="$out" method=ce seed=0,1,2
# A quantized copy of the teacher without data: resnet26 started from the teacher's weights, trained
# quantization-aware on the synthetic sets above (10 epochs at lr 0.005: a fine-tuning), exported as int8.
# teacher.epochs and teacher.lr stay the teacher's (they follow epochs and optim.lr unless given).
kdrun -m results_dir="$out" student=resnet26 student.quantize=int8 student.init=teacher transfer=synthetic \
  "${gen[@]}" transfer.synth=bn_stats,deepinversion method=kd method.alpha=1 epochs=10 optim.lr=0.005 \
  teacher.epochs=30 teacher.lr=0.05 seed=0,1,2
