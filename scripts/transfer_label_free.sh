#!/usr/bin/env bash
# Label-free vs labelled KD on Fashion-MNIST when only 10% of the training split has labels (SSLD's setting,
# scaled down): the resnet20 teacher trains on the labelled 10% (6,000 images, stratified); one student
# learns from those 6,000 with CE + KD, the other from all 60,000 images with no label at all (teacher outputs
# only; SSLD's symmetric-KL "JS" loss). Each student sees 180,000 images in all (30 epochs of 6,000, 3 of
# 60,000). About 50 minutes on one free CPU core.
#   scripts/transfer_label_free.sh [results dir, default results/transfer_label_free]
set -euo pipefail
out=${1:-results/transfer_label_free}
common=(dataset=fashion_mnist teacher=resnet20 student=resnet8 teacher.epochs=15 batch_size=128
        transfer.labelled_fraction=0.1 results_dir="$out")
kdrun -m "${common[@]}" transfer=labelled method=kd epochs=30 seed=0,1,2
kdrun -m "${common[@]}" transfer=label_free method=kd method.alpha=1 epochs=3 seed=0,1,2 transfer.divergence=js
kdrun compare "$out" --format markdown
