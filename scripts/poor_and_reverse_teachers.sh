#!/usr/bin/env bash
# Tf-KD's ablations: a teacher snapshot after 1 epoch, reverse KD, and the ce baselines of both students.
set -euo pipefail
kdrun -m +experiment=tfkd_poor_teacher method=ce,kd seed=0,1,2 "$@"
kdrun -m +experiment=tfkd_reverse_kd method=ce,kd seed=0,1,2 "$@"
kdrun compare results --where dataset=cifar100 --by method,teacher,student
