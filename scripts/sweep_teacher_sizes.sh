#!/usr/bin/env bash
# Teacher size vs student accuracy: KD into resnet8 from resnet8 .. resnet110 (default dataset: cifar10).
set -euo pipefail
kdrun -m +sweep=teacher_sizes dataset=cifar10 epochs=200 "$@"
kdrun compare results --where method=kd --by teacher --plot results/teacher_sizes.png
