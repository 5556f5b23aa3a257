#!/usr/bin/env bash
# The all-methods sweep on a SLURM cluster (hydra-submitit-launcher; one GPU per job).
#   scripts/slurm_all_methods.sh hydra.launcher.partition=gpu
set -euo pipefail
kdrun -m hydra/launcher=slurm +experiment=repdistiller_cifar100 +sweep=all_methods "$@"
