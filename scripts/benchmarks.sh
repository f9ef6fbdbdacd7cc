#!/usr/bin/env bash
# docs/benchmarks.md: measured vs ideal speedup for the reference model's architecture, d12, d16 and
# d20 at batch 1, 4 and 8 (CPU, fp32, random weights: timing does not depend on them), each scale's
# step timed in every run, the reference model's component breakdown, and what --compile does.
# Run it on a quiet machine.
# Usage: scripts/benchmarks.sh [OUT] [REPEATS]   (about 50 minutes on 2 CPU cores)
set -euo pipefail
out=${1:-runs/bench}
repeats=${2:-5}
actvar=${ACTVAR:-actvar}
mkdir -p "$out"
# the reference model's runs are short and noisy: three times the repeats
$actvar bench --arch tiny --batch-size 1,4,8 --by-scale --repeats $((3 * repeats)) --device cpu --dtype fp32 \
    --json > "$out/tiny.json"
$actvar bench --arch d12,d16,d20 --batch-size 1,4,8 --by-scale --repeats "$repeats" --device cpu --dtype fp32 \
    --json > "$out/official.json"
$actvar bench --arch tiny --batch-size 8 --breakdown --repeats "$repeats" --device cpu --dtype fp32 \
    --json > "$out/breakdown-tiny-8.json"
for flag in "" --compile; do
    $actvar bench --arch tiny --batch-size 8 --repeats "$repeats" --device cpu --dtype fp32 $flag --json \
        > "$out/compile-tiny-8${flag:+-compiled}.json"
done
python3 "$(dirname "$0")/bench_table.py" "$out/tiny.json" "$out/official.json" "$out/breakdown-tiny-8.json" \
    --plot docs/benchmarks-scales.png tiny:8,d12:4,d16:4,d20:4 > "$out/tables.md"
echo "results in $out/ (tables: $out/tables.md)"
