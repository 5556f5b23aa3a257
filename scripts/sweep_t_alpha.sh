#!/usr/bin/env bash
# KD temperature x alpha grid (default: Ruffy & Chahal's CIFAR-10 ResNet26 -> ResNet8 protocol).
set -euo pipefail
kdrun -m +experiment=ruffy_cifar10_resnet8 +sweep=t_alpha_grid "$@"
kdrun compare results --where dataset=cifar10 --by T,alpha --sort
