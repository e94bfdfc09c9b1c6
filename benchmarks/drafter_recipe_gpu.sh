#!/usr/bin/env bash
# The drafter-recipe experiment on one GPU, Ray-free (what ran on the H200 machine for the README's table;
# ../shared/GPU.md says how the target gets there):
# every head of the comparison trains at once in its own process (`koala train --no-ray`, each with a wall-clock
# budget), then each measures its MT-bench acceptance (tau, n-alpha; no timing, so they can share the GPU).
# `bench` then times vanilla, HF prompt lookup and the best EAGLE head alone on the GPU.
#
#   TARGET=/root/keep/smol.gguf DATA=.devcarry/data/smollm2_answers RUNS=/root/keep/runs \
#       bash benchmarks/drafter_recipe_gpu.sh train      # then: ... bench
#
# TRAIN_SECONDS (default 270) bounds each run's training time; the learning-rate schedule completes within it.
# For a quick look on a CPU: ONLY="eagle-k1 medusa-k1" EXTRA_ARGS="--max-train-tokens 3000" TRAIN_SECONDS=20
# PER_CATEGORY=1 MAX_NEW_TOKENS=16 (ONLY picks runs; EXTRA_ARGS goes to every `koala train`).
set -uo pipefail
phase=${1:?usage: drafter_recipe_gpu.sh train|bench}
TARGET=${TARGET:-smollm2}
DATA=${DATA:-../shared/data/smollm2_answers}
RUNS=${RUNS:-runs/recipe}
OUT=${OUT:-$RUNS/out}
TRAIN_SECONDS=${TRAIN_SECONDS:-270}
# The heads whose weights come back (a transfer holds 8 files of 16 MiB): the K=1 candidates and K=2.
KEEP_HEADS=${KEEP_HEADS:-eagle-k1 eagle-k1-lr3e-3 eagle-k1-adv0.1 eagle-k1-nofeat eagle-k2}
PY=${PY:-python3}
mkdir -p "$RUNS" "$OUT"

# name | extra arguments (otherwise: lr 1e-3 cosine, batch 32, 8k draft vocabulary, feature loss 1.0, lambda 0)
RUNS_TABLE="
eagle-k1|--head-type eagle --num-layers 1 --unroll-depth 4
eagle-k1-lr3e-3|--head-type eagle --num-layers 1 --unroll-depth 4 --set head_lr=3e-3
eagle-k1-unroll1|--head-type eagle --num-layers 1 --unroll-depth 1
eagle-k1-nofeat|--head-type eagle --num-layers 1 --unroll-depth 4 --set feature_loss_weight=0
eagle-k1-data25|--head-type eagle --num-layers 1 --unroll-depth 4 --max-train-tokens 330000
eagle-k1-adv0.1|--head-type eagle --num-layers 1 --unroll-depth 4 --adv-weight 0.1
eagle-k2|--head-type eagle --num-layers 2 --unroll-depth 4
eagle-k2-adv0.1|--head-type eagle --num-layers 2 --unroll-depth 4 --adv-weight 0.1
medusa-k1|--head-type medusa --num-layers 1
medusa-k1-adv0.1|--head-type medusa --num-layers 1 --adv-weight 0.1"

train_one() {
  local name=$1; shift
  # shellcheck disable=SC2068
  $PY -m pipeline.cli train --no-ray --data "$DATA" --target "$TARGET" --out "$RUNS/$name" --draft-vocab-size 8192 \
    --epochs 40 --set target.dtype=float32 --set tracking.enabled=false --set head_lr=1e-3 --set batch_size=32 \
    --set max_train_seconds="$TRAIN_SECONDS" --set log_every_steps=50 --set checkpoint_every_steps=100000 $@ \
    ${EXTRA_ARGS:-} \
    > "$RUNS/$name.log" 2>&1
  echo "[recipe] $name trained (exit $?): $(grep -a '\[train\] epoch' "$RUNS/$name.log" | tail -1)"
  $PY benchmarks/compare_heads.py --target "$TARGET" --dtype float32 --head "$name=$RUNS/$name/head" --no-vanilla \
    ${QUESTIONS:+--questions "$QUESTIONS"} \
    --per-category "${PER_CATEGORY:-4}" --max-new-tokens "${MAX_NEW_TOKENS:-128}" --deadline "${ACCEPT_SECONDS:-50}" \
    --json "$RUNS/$name/mtbench_acceptance.json" \
    > "$RUNS/$name.acceptance.log" 2>&1
  echo "[recipe] $name acceptance: $(grep -a '\[compare\]' "$RUNS/$name.acceptance.log" | tail -1)"
}

best_eagle_k1() {
  $PY - "$RUNS" $KEEP_HEADS <<'EOF'
import json, pathlib, sys
runs = pathlib.Path(sys.argv[1])
scores = {}
for name in sys.argv[2:]:
    path = runs / name / "mtbench_acceptance.json"
    if name.startswith("eagle-k1") and path.is_file():
        scores[name] = next(iter(json.loads(path.read_text())["methods"].values()))["tau"]
print(max(scores, key=scores.get))
EOF
}

case $phase in
  train)
    while IFS='|' read -r name extra; do
      [ -n "$name" ] || continue
      if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then continue; fi
      train_one "$name" $extra &
    done <<< "$RUNS_TABLE"
    wait
    # What comes back: K=1 EAGLE heads as fp16 (under 10 MB each), K=2 split in two, every run's logs and metrics.
    $PY - "$RUNS" "$OUT" $KEEP_HEADS <<'EOF'
import pathlib, shutil, sys, torch
from safetensors.torch import load_file, save_file
runs, out = map(pathlib.Path, sys.argv[1:3])
KEEP = sys.argv[3:]
for name in KEEP:
    head = runs / name / "head"
    if not (head / "head.safetensors").is_file():
        continue
    target = out / "heads" / name
    target.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(head / "head.safetensors").items()}
    save_file(tensors, target / "head.safetensors")
    shutil.copy(head / "head_config.json", target / "head_config.json")
EOF
    tar czf "$OUT/logs.tgz" -C "$RUNS" $(cd "$RUNS" && ls -d *.log */metrics.jsonl */train_summary.json */mtbench_acceptance.json 2>/dev/null)
    for name in $(cd "$OUT/heads" && ls); do
      size=$(stat -c %s "$OUT/heads/$name/head.safetensors")
      if [ "$size" -gt 15000000 ]; then
        tar cf - -C "$OUT/heads" "$name" | split -b 15000000 -d - "$OUT/head-$name.tar."
      else
        tar cf "$OUT/head-$name.tar" -C "$OUT/heads" "$name"
      fi
    done
    rm -rf "$OUT/heads"
    ls -la "$OUT"
    ;;
  bench)
    best=$(best_eagle_k1)
    echo "[recipe] timing vanilla, HF prompt lookup and $best"
    $PY benchmarks/compare_heads.py --target "$TARGET" --dtype float32 --head "$best=$RUNS/$best/head" \
      ${QUESTIONS:+--questions "$QUESTIONS"} \
      --per-category "${PER_CATEGORY:-4}" --max-new-tokens "${MAX_NEW_TOKENS:-128}" --deadline "${BENCH_SECONDS:-240}" \
      --json "$OUT/gpu_bench.json" \
      ${DRAFT_LENGTH:+--draft-length $DRAFT_LENGTH}
    ;;
esac
