#!/usr/bin/env bash
# "KD as a better initialisation" on the embedded digits set: (1) KD for the first k epochs, then CE alone,
# into a no-residual resnet20; (2) no-residual students alone and with KD. Tables and plots per sweep.
set -euo pipefail
root=${1:-results}
kdrun -m +sweep=kd_as_init results_dir="$root/kd_as_init"
kdrun compare "$root/kd_as_init" --by method.kd_until_epoch --format markdown --out "$root/kd_as_init/compare.md"
kdrun compare "$root/kd_as_init" --by method.kd_until_epoch --plot "$root/kd_as_init/compare.png" \
  --curves "$root/kd_as_init/curves.png"
kdrun -m +sweep=no_residual_students results_dir="$root/no_residual"
kdrun compare "$root/no_residual" --format markdown --out "$root/no_residual/compare.md"
kdrun compare "$root/no_residual" --plot "$root/no_residual/compare.png"
