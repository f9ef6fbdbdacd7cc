#!/usr/bin/env bash
# docs/comparison.md: every method on the reference model, and the paper's claims after the same
# distillation: dynamic vs fixed tokens (Table 4), dynamic vs static experts (Table 5) at equal FLOPs,
# and the rate trade-off (Table 2).
# Usage: scripts/comparison.sh [OUT]   (about 20 minutes on 2 CPU cores, after scripts/quality-study.sh)
set -euo pipefail
out=${1:-runs/comparison}
num=${NUM:-200}
steps1=${STEPS1:-40}
steps2=${STEPS2:-80}
actvar=${ACTVAR:-actvar}
mkdir -p "$out"

distil() {  # NAME MOEFY-ARGS...: convert, then both stages (stage 2 only for static experts)
    local name=$1
    shift
    $actvar moefy tiny -o "$out/$name.safetensors" "$@" --json > "$out/$name-moefy.json"
    local model="$out/$name.safetensors"
    if [[ "$*" != *static-experts* ]]; then
        $actvar distill-stage1 "$model" --out-dir "$out/$name-s1" --max-steps "$steps1" --overwrite --json \
            > "$out/$name-s1.json"
        model="$out/$name-s1/model.safetensors"
    fi
    $actvar distill-stage2 "$model" --out-dir "$out/$name-s2" --max-steps "$steps2" --overwrite --json \
        > "$out/$name-s2.json"
}

# Table 4: adaptive tokens (the paper's per-block selector, with the recipe's other choices) vs tokens
# fixed at the first sparse scale (weights dense: equal FLOPs)
recipes=$(python -c "from actvar_cli.train.recipes import RECIPE_DIR; print(RECIPE_DIR)")
sed 's/^token_rule: fixed /token_rule: selector/' "$recipes/tiny.yaml" > "$out/tiny-selector.yaml"
grep -q "^token_rule: selector" "$out/tiny-selector.yaml"
distil dynamic-tokens --weight-rate 1 --config "$out/tiny-selector.yaml"
distil fixed-tokens --method fixed-tokens:0.75
# Table 5: dynamic experts vs the same experts for every token (tokens dense: equal FLOPs)
distil dynamic-experts --token-rate 1
distil static-experts --method static-experts:0.75
# Table 2's rate trade-off: the default policy and the (50%, 25%; 50%) corner, distilled by
# scripts/quality-study.sh (QUALITY, default runs/quality)
quality=${QUALITY:-runs/quality}

distilled=""
for name in dynamic-tokens fixed-tokens dynamic-experts static-experts; do
    distilled+="actvar:$out/$name-s2/model.safetensors,"
done
distilled+="actvar:$quality/default-s2/model.safetensors,actvar:$quality/corner-s2/model.safetensors,"

$actvar compare tiny --methods "${distilled%,}" --ref shapes --num "$num" --json --plot "$out/distilled.png" \
    > "$out/distilled.json"
# every method without training at two or three budgets, beside ActVAR converted and distilled
$actvar compare tiny --ref shapes --num "$num" --repeats 7 --json --plot "$out/budgets.png" --methods \
actvar,actvar:$quality/corner.safetensors,actvar:$quality/default-s2/model.safetensors,\
actvar:$quality/corner-s2/model.safetensors,static-experts:0.75,static-experts:0.5,fixed-tokens:0.75,\
fixed-tokens:0.5,fastvar:0.25,fastvar:0.5,fastvar:0.75,dmoe:0.5,dmoe:0.9,skip-last:1,skip-last:2,cfg-off:1,\
cfg-off:2,cfg-sharp:1,cfg-sharp:2,cfg-sharp:3,w8a8,ear:0.75,ear:0.5 > "$out/budgets.json"
echo "results in $out/"
