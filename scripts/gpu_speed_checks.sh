#!/usr/bin/env bash
# The speed checks that need a GPU, in one short run (sized for about 8 minutes on one recent GPU; not yet run):
#   1. scripts/bench_peers.py --device cuda on both pairs (kdrun plain, cache, fused, compiled against the
#      minimal loop, torchdistill and, with REPDISTILLER=/path, RepDistiller);
#   2. a 16-job T x alpha sweep of kd resnet26 -> resnet8 on Fashion-MNIST (1 epoch each), timed as whole
#      sweeps: one job after another, with the teacher-output cache, fused K=8, fused K=8 + cache, compiled;
#      fp32 and bf16. The table gives jobs per hour and the ratio to the plain sweep.
#   scripts/gpu_speed_checks.sh [output dir, default results/bench/gpu]
set -euo pipefail
out=${1:-results/bench/gpu}
mkdir -p "$out"
repdistiller=()
[[ -n "${REPDISTILLER:-}" ]] && repdistiller=(--repdistiller "$REPDISTILLER")

python scripts/bench_peers.py --device cuda --rounds 3 --pairs resnet26:resnet8,resnet32x4:resnet8x4 \
    "${repdistiller[@]}" | tee "$out/peers_cuda.md"

fmnist=/usr/share/datasets/fashion-mnist
if [[ ! -e "$fmnist/train-images-idx3-ubyte.gz" ]]; then
    echo "Fashion-MNIST is not at $fmnist (apt-get install dataset-fashion-mnist): the sweep timings are skipped"
    exit 0
fi
grid=(method=kd method.T=1,2,4,8 method.alpha=0.3,0.5,0.7,0.9)  # 16 jobs
common=(dataset=fashion_mnist epochs=1 teacher.epochs=2 skip_completed=false
        "results_dir=$out/sweeps" device=cuda)
kdrun "${common[@]}" method=kd epochs=1 run_dir="$out/sweeps/warmup"  # trains the teacher once, for every sweep
echo "| precision | sweep | seconds | jobs/h | x plain |" > "$out/sweeps.md"
echo "|---|---|---:|---:|---:|" >> "$out/sweeps.md"
for precision in fp32 bf16; do
    plain=""
    for variant in plain cache fused8 fused8_cache compiled; do
        case $variant in
            plain) extra=(teacher.cache_outputs=false) ;;
            cache) extra=(teacher.cache_outputs=true) ;;
            fused8) extra=(teacher.cache_outputs=false fuse=8) ;;
            fused8_cache) extra=(teacher.cache_outputs=true fuse=8) ;;
            compiled) extra=(teacher.cache_outputs=false compile=true) ;;
        esac
        start=$(date +%s.%N)
        kdrun -m "${common[@]}" "${grid[@]}" "precision=$precision" "${extra[@]}" > "$out/sweep_${precision}_$variant.log" 2>&1
        seconds=$(python -c "import time; print(f'{time.time() - $start:.1f}')")
        [[ -z "$plain" ]] && plain=$seconds
        python -c "s, p = $seconds, $plain; print(f'| $precision | $variant | {s:.1f} | {16 * 3600 / s:.0f} | {p / s:.2f} |')" \
            >> "$out/sweeps.md"
    done
done
cat "$out/sweeps.md"
