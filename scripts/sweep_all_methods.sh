#!/usr/bin/env bash
# Every method x 3 seeds for one teacher/student pair (default: the RepDistiller CIFAR-100 protocol).
#   scripts/sweep_all_methods.sh [extra overrides, e.g. teacher=wrn_40_2 student=wrn_16_2]
set -euo pipefail
kdrun -m +experiment=repdistiller_cifar100 +sweep=all_methods "$@"
kdrun compare results --where dataset=cifar100 --sort --protocol
