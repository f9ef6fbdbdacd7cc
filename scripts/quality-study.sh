#!/usr/bin/env bash
# docs/quality.md: the reference model dense, converted, after stage 1 and after stage 2, for the
# paper's default policy and its most aggressive Table 2 corner (tokens 50%/25%, weights 50%).
# Usage: scripts/quality-study.sh [OUT]   (about 20 minutes on 2 CPU cores)
set -euo pipefail
out=${1:-runs/quality}
num=${NUM:-500}
steps1=${STEPS1:-80}
steps2=${STEPS2:-160}
actvar=${ACTVAR:-actvar}
mkdir -p "$out"
score() {  # MODEL NAME: class accuracy and FID on shapes, agreement with the dense model
    $actvar eval "$1" --fid --is --ref shapes --num "$num" --teacher auto --out "$out/eval-$2" --overwrite --json \
        > "$out/$2.json"
}
$actvar eval tiny --fid --is --ref shapes --num "$num" --out "$out/eval-dense" --overwrite --json > "$out/dense.json"
for policy in default aggressive; do
    flags=()
    [ "$policy" = aggressive ] && flags=(--token-rates 0.5,0.25 --weight-rate 0.5)
    $actvar moefy tiny -o "$out/$policy.safetensors" "${flags[@]}" --json > "$out/$policy-moefy.json"
    score "$out/$policy.safetensors" "$policy-converted"
    $actvar distill-stage1 "$out/$policy.safetensors" --out-dir "$out/$policy-s1" --max-steps "$steps1" \
        --overwrite --json > "$out/$policy-s1-train.json"
    score "$out/$policy-s1/model.safetensors" "$policy-stage1"
    $actvar distill-stage2 "$out/$policy-s1/model.safetensors" --out-dir "$out/$policy-s2" --max-steps "$steps2" \
        --overwrite --json > "$out/$policy-s2-train.json"
    score "$out/$policy-s2/model.safetensors" "$policy-stage2"
done
echo "results in $out/*.json"
