#!/usr/bin/env bash
# Trains EAGLE and Medusa heads (K=1 lambda=0 and K=2 lambda=0.1) on distilled SmolLM2 data and benchmarks each on
# 16 MT-bench first turns (2 per category) against vanilla decoding. Prerequisite (the distillation stage):
#   koala distill --prompts ../shared/data/sharegpt_prompts/ShareGPT_V3_filtered_1000.json \
#       ../shared/data/sharegpt_prompts/ShareGPT_V3_filtered_500.json \
#       ../shared/data/sharegpt_prompts/sg_90k_part1_html_cleaned_lang_first_sampled_sorted.json \
#       --max-prompts 1100 --max-new-tokens 128 --out runs/data/sharegpt-1k --set max_prompt_tokens=384
set -euo pipefail
cd "$(dirname "$0")/.."
K=.venv/bin/koala
DATA="${DATA:-runs/data/sharegpt-1k}"
EPOCHS="${EPOCHS:-3}"
HEAD_LR="${HEAD_LR:-1e-3}"
VOCAB="${VOCAB:-8192}"
for spec in "eagle 1 0" "eagle 2 0.1" "medusa 1 0" "medusa 2 0.1"; do
    read -r type layers lambda <<<"$spec"
    name="$type-k$layers-l$lambda"
    $K train --data "$DATA" --out "runs/train/$name" --head-type "$type" --num-layers "$layers" \
        --adv-weight "$lambda" --draft-vocab-size "$VOCAB" --epochs "$EPOCHS" --set head.num_heads=3 --set head_lr="$HEAD_LR"
done
for spec in "eagle 1 0" "eagle 2 0.1" "medusa 1 0" "medusa 2 0.1"; do
    read -r type layers lambda <<<"$spec"
    name="$type-k$layers-l$lambda"
    $K bench --drafter "runs/train/$name/head" --per-category 2 --max-new-tokens 128 --no-hf \
        --json "runs/bench-trained-$name.json"
done
