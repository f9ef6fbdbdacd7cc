#!/usr/bin/env bash
# docs/benchmarks.md: measured vs ideal speedup for the reference model's architecture, d12, d16 and
# d20 at batch 1, 4 and 8 (CPU, fp32, random weights: timing does not depend on them), the
# breakdown of the worst point, and what --compile does. Run it on a quiet machine.
# Usage: scripts/benchmarks.sh [OUT] [REPEATS]   (about an hour on 2 CPU cores)
set -euo pipefail
out=${1:-runs/bench}
repeats=${2:-3}
actvar=${ACTVAR:-actvar}
mkdir -p "$out"
$actvar bench --sweep --repeats "$repeats" --device cpu --dtype fp32 --json > "$out/sweep.json"
worst=$(python3 -c "
import json
points = json.load(open('$out/sweep.json'))['points']
w = min(points, key=lambda p: p['efficiency'] if p['efficiency'] is not None else 9)
print(w['arch'], w['batch_size'])")
read -r arch batch <<< "$worst"
$actvar bench --arch "$arch" --batch-size "$batch" --breakdown --repeats "$repeats" --device cpu --dtype fp32 \
    --json > "$out/breakdown-$arch-$batch.json"
$actvar bench --arch d16 --batch-size 4 --breakdown --repeats "$repeats" --device cpu --dtype fp32 --json \
    > "$out/breakdown-d16-4.json"
for flag in "" --compile; do
    $actvar bench --arch tiny --batch-size 8 --repeats "$repeats" --device cpu --dtype fp32 $flag --json \
        > "$out/compile-tiny-8${flag:+-compiled}.json"
done
echo "results in $out/"
