#!/usr/bin/env bash
# docs/quality.md: the reference model dense, converted, after stage 1 and after stage 2 with the tiny
# recipe's default schedule (no step flags), for the paper's default rates, the same FLOPs as the
# paper's default without skipped keys (tokens 60%), and the Table 2 corner (tokens 50%/25%, weights
# 50%). Every model: FID, IS and class accuracy on NUM samples of seed SEED, and agreement with the
# dense model per scale (eval --teacher auto).
# Usage: scripts/quality-study.sh [OUT]   (about 45 minutes on 2 CPU cores)
# Resumable: a step whose output is already in OUT is not run again (delete it to redo it).
set -euo pipefail
out=${1:-runs/quality}
num=${NUM:-500}
seed=${SEED:-7}
actvar=${ACTVAR:-actvar}
policies=${POLICIES:-default equal-flops corner}
mkdir -p "$out"
score() {  # MODEL NAME
    [ -s "$out/$2.json" ] && return
    $actvar eval "$1" --fid --is --ref shapes --num "$num" --seed "$seed" --teacher auto --psnr-images 50 --out "$out/eval-$2" \
        --overwrite --json > "$out/$2.json"
}
[ -f "$out/dense.json" ] || $actvar eval tiny --fid --is --ref shapes --num "$num" --seed "$seed" \
    --out "$out/eval-dense" --overwrite --json > "$out/dense.json"
for policy in $policies; do
    flags=()
    [ "$policy" = equal-flops ] && flags=(--token-rates 0.6,0.6)
    [ "$policy" = corner ] && flags=(--token-rates 0.5,0.25 --weight-rate 0.5)
    [ -f "$out/$policy.safetensors" ] ||
        $actvar moefy tiny -o "$out/$policy.safetensors" "${flags[@]}" --json > "$out/$policy-moefy.json"
    score "$out/$policy.safetensors" "$policy-converted"
    [ -f "$out/$policy-s1/model.safetensors" ] || $actvar distill-stage1 "$out/$policy.safetensors" --out-dir "$out/$policy-s1" --overwrite --json \
        > "$out/$policy-s1-train.json"
    score "$out/$policy-s1/model.safetensors" "$policy-stage1"
    [ -f "$out/$policy-s2/model.safetensors" ] || $actvar distill-stage2 "$out/$policy-s1/model.safetensors" --out-dir "$out/$policy-s2" --overwrite --json \
        > "$out/$policy-s2-train.json"
    score "$out/$policy-s2/model.safetensors" "$policy-stage2"
done
echo "results in $out/*.json"
