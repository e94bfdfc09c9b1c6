#!/usr/bin/env bash
# One GPU session, Ray-free (what ran on the lent GPU machine for the README's "self-instruct data" figures;
# ../shared/GPU.md says how the target gets there). Phase `main`, within about 9.5 minutes:
#   1. in the background: the core's tests on CUDA (KOALA_TEST_DEVICE=cuda), and a bf16 losslessness audit of the
#      shipped head (its timings share the GPU and are not reported; the audit's verdicts do not depend on timing);
#   2. the target writes user prompts (koala self-prompts) and answers them (koala distill --no-ray), on CUDA;
#   3. the shipped head is trained further on those answers plus ../shared/data/smollm2_answers (koala train --no-ray);
#   4. vanilla decoding, HF prompt lookup and the new head are timed on MT-bench first turns, fp32, greedy.
# Phase `grow` (about 8 minutes, then phase `time` at once on the same machine): the shipped head audited and timed
# in fp32 and bf16 against vanilla, HF generate and HF prompt lookup; the core's tests on CUDA in the background
# while PROMPTS more self-instruct prompts are written and answered and the shipped head trains on all the data.
# Phase `fusion` (about 9.5 minutes): EAGLE-3 style fusion against the plain head at equal training time (the shipped
# head trained further for TRAIN_SECONDS as it is, and reading layers FUSE_LAYERS too), then both as chains, trees
# and trees with a prompt-lookup branch against vanilla and HF prompt lookup on MT-bench first turns.
# Phase `trees` (TREES_SECONDS, 5 minutes by default, after the target is set up; 470 s covered 32 prompts on an
# H200): the shipped head's 64-path static tree at depth 4 drafted at the auto (learnt) budget, whole (its 41 paths
# within depth 4) and as its first 24 paths, and an EAGLE-2 dynamic tree, against vanilla and HF prompt lookup,
# MT-bench first turns, fp32; the JSON names the tree sizes drafted, trees.log the learnt budget's choices.
# Phase `verify` (a later short session): the core's tests on CUDA, the shipped head audited and timed against
# vanilla, HF generate and HF prompt lookup in fp32 and bf16, and bf16 decoding with and without cuDNN attention.
#
#   DATA=.devcarry/data RUNS=/root/keep/runs bash benchmarks/gpu_selfinstruct.sh main     # or: ... verify
#
# For a quick look on a CPU: PROMPTS=8 BATCH=8 TRAIN_SECONDS=20 TRAIN_EXTRA="--max-train-tokens 3000" PER_CATEGORY=1
# MAX_NEW_TOKENS=16 TESTS=tests/test_losses.py (TRAIN_EXTRA goes to koala train).
# Every step has a time limit; each writes as it goes, so a step cut short still leaves what it made.
set -uo pipefail
phase=${1:?usage: gpu_selfinstruct.sh main|grow|time|verify|fusion|trees}
DATA=${DATA:-../shared/data}
RUNS=${RUNS:-runs/selfinstruct}
OUT=${OUT:-$RUNS/out}
PY=${PY:-python3}
TARGET=${TARGET:-smollm2}
PROMPTS=${PROMPTS:-8192}           # self-instruct prompts to write
PROMPT_SECONDS=${PROMPT_SECONDS:-60}
DISTILL_SECONDS=${DISTILL_SECONDS:-100}
TRAIN_SECONDS=${TRAIN_SECONDS:-160}
BUDGET=${BUDGET:-560}              # the whole main phase, seconds
BATCH=${BATCH:-1024}               # generation batch (rows)
PER_CATEGORY=${PER_CATEGORY:-4}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-128}
TEST_SECONDS=${TEST_SECONDS:-300}
stamp() { echo "[gpu +${SECONDS}s] $*"; }
mkdir -p "$RUNS" "$OUT"
NEW_HEAD=$RUNS/train/head
DRAFTER=${DRAFTER:-pipeline/drafters/smollm2-eagle}
CORE_TESTS="tests/test_decoding.py tests/test_heads.py tests/test_trees.py tests/test_audit.py tests/test_losses.py
  tests/test_training.py tests/test_architectures.py tests/test_smollm2.py"

start() {
  stamp "start: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo no GPU)"
  # The target loads once here, so the later (and parallel) steps find its converted copy in the cache.
  $PY -c "from pipeline.target import load_target; load_target('$TARGET', dtype='float32')" 2>&1 | tail -1
}

# The core's tests on CUDA, verbose, so a run cut by its time limit still names the tests that failed.
cuda_tests() {
  # shellcheck disable=SC2086
  KOALA_TEST_DEVICE=cuda timeout "$TEST_SECONDS" $PY -m pytest -v --tb=short -rf -p no:cacheprovider \
    ${TESTS:-$CORE_TESTS} > "$OUT/cuda_tests.log" 2>&1
  echo "exit $?" >> "$OUT/cuda_tests.log"
}
tests_summary() { stamp "tests: $(grep -E '(passed|failed)' "$OUT/cuda_tests.log" | tail -1) $(tail -1 "$OUT/cuda_tests.log")"; }

# DRAFTER audited and timed against vanilla, HF generate and HF prompt lookup: $1 seconds per dtype, then the
# fp32 and the bf16 prompt selection (bench options).
audited_benches() {
  local seconds=$1 fp32=$2 bf16=$3 run
  for run in "float32 $fp32" "bfloat16 $bf16"; do
    set -- $run
    timeout "$seconds" $PY -m pipeline.cli bench --target "$TARGET" --drafter "$DRAFTER" \
      --dtype "$1" --audit "$2" "$3" --max-new-tokens "$MAX_NEW_TOKENS" \
      --questions "$DATA/mt_bench/question.jsonl" --json "$OUT/audit_$1.json" 2>&1 \
      | grep --line-buffered -v "Warn\|warn\|koala bench:" | tail -12
    stamp "audit $1 done"
  done
}

# The target writes prompts into $RUNS/self_prompts.jsonl until it holds $1.
write_prompts() {
  timeout "$PROMPT_SECONDS" $PY -m pipeline.cli self-prompts --target "$TARGET" --count "$1" \
    --out "$RUNS/self_prompts.jsonl" --set batch_size="$BATCH" --set target.dtype=bfloat16 2>&1 \
    | grep --line-buffered -v "^WARNING pipeline.stages.self_prompts" | tail -3
}

# The target answers the prompts in $1 into $RUNS/$2.
distill_answers() {
  stamp "distill"
  timeout "$DISTILL_SECONDS" $PY -m pipeline.cli distill --no-ray --target "$TARGET" \
    --prompts "$1" --out "$RUNS/$2" --max-new-tokens 192 \
    --set batch_size="$BATCH" --set shard_size="$BATCH" --set target.dtype=bfloat16 \
    --set tracking.enabled=false 2>&1 | grep --line-buffered "distill" | tail -4
  stamp "distill: $(ls "$RUNS/$2"/shard-*.parquet 2>/dev/null | wc -l) shards"
}

# DRAFTER trained further into $RUNS/$TRAIN_OUT (train) on the data directories given: $1 cache_limit_gb, $2 seconds
# allowed beyond TRAIN_SECONDS (loading, features, validation), then the directories, plus $RUNS/$3 if it holds
# answers.
train_further() {
  local cache_gb=$1 margin=$2 answers=$3 out=${TRAIN_OUT:-train}
  shift 3
  ls "$RUNS/$answers"/shard-*.parquet > /dev/null 2>&1 && set -- "$@" "$RUNS/$answers"
  stamp "train $out"
  # shellcheck disable=SC2086
  timeout $((TRAIN_SECONDS + margin)) $PY -m pipeline.cli train --no-ray --target "$TARGET" --data "$@" \
    --out "$RUNS/$out" --head-type eagle --num-layers 1 --draft-vocab-size 8192 --unroll-depth 2 --epochs 100 \
    --set init_head="$DRAFTER" --set head_lr=5e-4 --set batch_size=64 \
    --set target.dtype=float32 --set tracking.enabled=false --set max_train_seconds="$TRAIN_SECONDS" \
    --set cache_limit_gb="$cache_gb" --set log_every_steps=50 --set checkpoint_every_steps=100000 \
    ${TRAIN_EXTRA:-} > "$RUNS/$out.log" 2>&1
}

# The new head (or HEAD) timed against vanilla and HF prompt lookup on MT-bench first turns, fp32, greedy, until
# the deadline $1 (seconds); the JSON is rewritten after every prompt, so a cut run keeps what it measured.
time_new_head() {
  $PY benchmarks/compare_heads.py --target "$TARGET" --dtype float32 --head "new=${HEAD:-$NEW_HEAD}" \
    --questions "$DATA/mt_bench/question.jsonl" --per-category "$PER_CATEGORY" \
    --max-new-tokens "$MAX_NEW_TOKENS" --deadline "$1" --json "$OUT/gpu_compare.json" 2>&1 \
    | grep --line-buffered -v "Warn\|warn" | tail -15
}

# NEW_HEAD as fp16 into the tar file $1.tar (nothing when it was not trained).
pack_head() {
  $PY - "$NEW_HEAD" "$1" <<'EOF'
import pathlib, shutil, sys
from safetensors.torch import load_file, save_file
source, target = map(pathlib.Path, sys.argv[1:3])
if (source / "head.safetensors").is_file():
    target.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(source / "head.safetensors").items()}
    save_file(tensors, target / "head.safetensors")
    shutil.copy(source / "head_config.json", target / "head_config.json")
EOF
  [ -d "$1" ] && tar cf "$1.tar" -C "$(dirname "$1")" "$(basename "$1")" && rm -rf "$1"
}

# What comes back: the new head (fp16), the logs and the new self-instruct data (prompts and answers).
pack_results() {
  local answers=$1
  pack_head "$OUT/head"
  tar czf "$OUT/logs.tgz" -C "$RUNS" $(cd "$RUNS" && ls -d *.log train/metrics.jsonl train/train_summary.json \
    "$answers"/summary.json 2>/dev/null)
  tar czf "$OUT/selfinstruct_data.tgz" -C "$RUNS" $(cd "$RUNS" && ls -d self_prompts.jsonl new_prompts.jsonl \
    "$answers" 2>/dev/null)
  stamp "done"; ls -la "$OUT"
}

case $phase in
  main)
    start
    OMP_NUM_THREADS=4 cuda_tests &
    tests_pid=$!
    (OMP_NUM_THREADS=2 timeout 300 $PY -m pipeline.cli bench --target "$TARGET" --dtype bfloat16 --audit --no-hf \
       --per-category 2 --max-new-tokens "$MAX_NEW_TOKENS" --questions "$DATA/mt_bench/question.jsonl" \
       --json "$OUT/audit_bf16_shipped.json" > "$RUNS/audit_bf16_shipped.log" 2>&1) &
    audit_pid=$!

    stamp "self-prompts"
    write_prompts "$PROMPTS"
    stamp "self-prompts: $(wc -l < "$RUNS/self_prompts.jsonl") prompts"
    distill_answers "$RUNS/self_prompts.jsonl" selfinstruct_answers
    train_further 16 120 selfinstruct_answers "$DATA/smollm2_answers"
    stamp "train exit $?: $(grep -a '\[train\] epoch' "$RUNS/train.log" | tail -1)"
    grep -a '\[train\] epoch' "$RUNS/train.log" | sed 's/^.*\[train\]/[train]/'
    # Parameters train in fp32 (bf16 autocast only computes in bf16): the trainer state says which dtypes it holds.
    $PY -c "import collections, sys; from safetensors.torch import load_file; \
print('[train] trainer state dtypes:', dict(collections.Counter(str(t.dtype) for t in load_file(sys.argv[1]).values())))" \
      "$RUNS/train/checkpoint/trainer_state.safetensors" 2>&1 | tail -1

    # The background work must not share the GPU with the timed comparison.
    wait "$audit_pid"; kill "$tests_pid" 2>/dev/null; wait "$tests_pid"
    tests_summary
    stamp "bf16 audit: $(grep -a -i 'violation\|near' "$RUNS/audit_bf16_shipped.log" | head -2 | tr '\n' ' ')"

    left=$((BUDGET - SECONDS - 25))
    stamp "timing vanilla, HF prompt lookup and the new head (deadline ${left}s)"
    if [ -f "$NEW_HEAD/head.safetensors" ] && [ "$left" -gt 30 ]; then
      time_new_head "$left"
    fi
    pack_results selfinstruct_answers
    ;;
  grow)
    # One more point on the tau-against-data curve, within about 9.5 minutes: first the shipped head's audited fp32
    # and bf16 benches with the HF baselines, alone on the GPU (their timings are reported); then, with the core's
    # tests on CUDA in the background, the target writes PROMPTS more prompts (continuing data/smollm2-selfinstruct's
    # file, so every batch is new) and answers them, and the shipped head trains further on all three datasets.
    start
    audited_benches "${AUDIT_SECONDS:-75}" "${AUDIT_FP32:---per-category 1}" "${AUDIT_BF16:---limit 3}"
    OMP_NUM_THREADS=4 cuda_tests &
    tests_pid=$!

    known=data/smollm2-selfinstruct/self_prompts.jsonl
    cp "$known" "$RUNS/self_prompts.jsonl"
    stamp "self-prompts: $PROMPTS more"
    write_prompts $(( $(wc -l < "$known") + PROMPTS ))
    tail -n +$(( $(wc -l < "$known") + 1 )) "$RUNS/self_prompts.jsonl" > "$RUNS/new_prompts.jsonl"
    stamp "self-prompts: $(wc -l < "$RUNS/new_prompts.jsonl") new prompts"
    distill_answers "$RUNS/new_prompts.jsonl" selfinstruct2_answers
    train_further 24 90 selfinstruct2_answers "$DATA/smollm2_answers" data/smollm2-selfinstruct
    stamp "train exit $?"
    grep -a '\[train\]' "$RUNS/train.log" | sed 's/^.*\[train\]/[train]/' | tail -14

    kill "$tests_pid" 2>/dev/null; wait "$tests_pid"
    tests_summary
    pack_results selfinstruct2_answers
    ;;
  time)
    time_new_head "$((BUDGET - 15))"
    ;;
  fusion)
    start
    for variant in plain fused; do
      extra=""
      [ "$variant" = fused ] && extra="--extra-feature-layers ${FUSE_LAYERS:-2 15}"
      TRAIN_OUT=$variant TRAIN_EXTRA="$extra ${TRAIN_EXTRA:-}" train_further 24 60 none "$DATA/smollm2_answers" \
        data/smollm2-selfinstruct
      stamp "$variant: $(grep -a '\[train\] epoch' "$RUNS/$variant.log" | tail -1)"
      grep -a '\[train\] epoch' "$RUNS/$variant.log" | sed 's/^.*\[train\]/[train]/'
    done
    left=$((BUDGET - SECONDS - 20))
    stamp "timing (deadline ${left}s)"
    heads=()
    for variant in plain fused; do
      [ -f "$RUNS/$variant/head/head.safetensors" ] || continue
      heads+=(--head "$variant=$RUNS/$variant/head" --head "$variant-chain=$RUNS/$variant/head@5,tree=chain"
              --head "$variant-lookup=$RUNS/$variant/head@4,lookup_tokens=${LOOKUP_TOKENS:-8}")
    done
    [ "${#heads[@]}" -gt 0 ] && $PY benchmarks/compare_heads.py --target "$TARGET" --dtype float32 "${heads[@]}" \
      --questions "$DATA/mt_bench/question.jsonl" --per-category "${PER_CATEGORY_FUSION:-2}" \
      --max-new-tokens "$MAX_NEW_TOKENS" --deadline "$left" --json "$OUT/fusion_compare.json" 2>&1 \
      | grep --line-buffered -v "Warn\|warn" | tail -15
    tar czf "$OUT/logs.tgz" -C "$RUNS" $(cd "$RUNS" && ls -d *.log */metrics.jsonl */train_summary.json 2>/dev/null)
    for variant in plain fused; do NEW_HEAD=$RUNS/$variant/head pack_head "$OUT/$variant-head"; done
    stamp "done"; ls -la "$OUT"
    ;;
  trees)
    start
    timeout "${TREES_SECONDS:-300}" $PY benchmarks/compare_heads.py --target "$TARGET" --dtype float32 \
      --head "auto=$DRAFTER@4" --head "full=$DRAFTER@4,tree_nodes=64" --head "dynamic=$DRAFTER@4,tree=dynamic" \
      --head "first24=$DRAFTER@4,tree_nodes=24" \
      --questions "$DATA/mt_bench/question.jsonl" --per-category "$PER_CATEGORY" --max-new-tokens "$MAX_NEW_TOKENS" \
      --deadline "$((${TREES_SECONDS:-300} - 30))" --json "$OUT/trees_compare.json" --log-trees 2>&1 \
      | grep --line-buffered -v "Warn\|warn" | tee "$OUT/trees.log" | tail -15
    stamp "done"
    ;;
  verify)
    # What a short session checks (about 5 minutes after the target is set up): the core's tests on CUDA, then the
    # shipped head (or DRAFTER) audited and timed against vanilla, HF generate and HF prompt lookup, fp32 then bf16
    # (bf16 on fewer prompts: at SmolLM2's size it is the slower dtype on a GPU).
    cuda_tests
    tests_summary
    audited_benches "${AUDIT_SECONDS:-120}" "--per-category 1" "--limit 3"
    # Decoding keeps cuDNN attention off (pipeline/decoding.py, DECODING_ATTENTION_BACKENDS): bf16 with and without.
    timeout "${AUDIT_SECONDS:-120}" $PY benchmarks/attention_backends.py --target "$TARGET" --dtype bfloat16 --limit 3 \
      --max-new-tokens "$MAX_NEW_TOKENS" --questions "$DATA/mt_bench/question.jsonl" \
      --json "$OUT/attention_backends.json" 2>&1 | grep --line-buffered -v "Warn\|warn" | tail -5
    ;;
esac
