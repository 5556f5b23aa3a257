#!/usr/bin/env bash
# Teacher-assistant chains resnet110 -> ... -> resnet8 under the TAKD CIFAR-100 recipe; each link trains once.
set -euo pipefail
kdrun -m +experiment=takd_cifar100 +sweep=ta_chains "$@"
kdrun compare results --where teacher=resnet110 --by assistants --plot results/ta_chains.png
