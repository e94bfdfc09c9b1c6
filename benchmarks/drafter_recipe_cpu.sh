#!/usr/bin/env bash
# The head comparison issue 9 asks for, at a CPU budget (when no GPU is lent): EAGLE K=1 and K=2 and Medusa K=1
# with lambda 0, and EAGLE K=1 with lambda 0.1, each trained from scratch by `koala train --no-ray` with the
# default recipe on the same MAX_TRAIN_TOKENS answer tokens of ../shared/data/smollm2_answers (8k draft
# vocabulary), one after another (2 cores), then timed together on MT-bench first turns by compare_heads.py:
# vanilla, HF prompt lookup and each head, alternating per prompt, greedy, fp32.
#
#   bash benchmarks/drafter_recipe_cpu.sh   # RUNS=runs/recipe-cpu MAX_TRAIN_TOKENS=150000 EPOCHS=1 VAL_FRACTION=0.01
#
# Validation is the costly part on a CPU (it replays 6-token drafting over every held-out row and scores the full
# vocabulary: about 0.75 s per row on 2 cores), hence 1 % of the rows held out instead of the default 5 %.
# ONLY="eagle-k1 medusa-k1" picks runs; PER_CATEGORY (4 = 32 prompts) and MAX_NEW_TOKENS (128) size the timing.
set -euo pipefail
TARGET=${TARGET:-smollm2}
DATA=${DATA:-../shared/data/smollm2_answers}
RUNS=${RUNS:-runs/recipe-cpu}
MAX_TRAIN_TOKENS=${MAX_TRAIN_TOKENS:-150000}
EPOCHS=${EPOCHS:-1}
VAL_FRACTION=${VAL_FRACTION:-0.01}
PY=${PY:-python3}
mkdir -p "$RUNS"

# name | arguments (otherwise the recipe's defaults: lr 1e-3 cosine, batch 32, unroll depth 1)
RUNS_TABLE="
eagle-k1|--head-type eagle --num-layers 1
eagle-k2|--head-type eagle --num-layers 2
medusa-k1|--head-type medusa --num-layers 1
eagle-k1-adv0.1|--head-type eagle --num-layers 1 --adv-weight 0.1"

heads=()
while IFS='|' read -r name arguments; do
  [ -n "$name" ] || continue
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then continue; fi
  if [ ! -f "$RUNS/$name/train_summary.json" ]; then
    # shellcheck disable=SC2086
    $PY -m pipeline.cli train --no-ray --data "$DATA" --target "$TARGET" --out "$RUNS/$name" $arguments \
      --draft-vocab-size 8192 --epochs "$EPOCHS" --max-train-tokens "$MAX_TRAIN_TOKENS" \
      --set val_fraction="$VAL_FRACTION" --set target.dtype=float32 --set tracking.enabled=false \
      > "$RUNS/$name.log" 2>&1
  fi
  echo "[recipe-cpu] $name: $($PY -c 'import json, sys; s = json.load(open(sys.argv[1]))
print("best val tau %.3f (epoch %s), %s answer tokens, %.0f s" % (s["best_val_tau"], s["best_epoch"],
      s["train_response_tokens"], s["wall_time_s"]))' "$RUNS/$name/train_summary.json")"
  heads+=(--head "$name=$RUNS/$name/head")
done <<< "$RUNS_TABLE"

$PY benchmarks/compare_heads.py --target "$TARGET" --dtype float32 "${heads[@]}" \
  --per-category "${PER_CATEGORY:-4}" --max-new-tokens "${MAX_NEW_TOKENS:-128}" --json "$RUNS/compare.json"
