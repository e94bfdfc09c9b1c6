#!/usr/bin/env bash
# The main job on the embedded default: set up, write a fresh EAGLE head for SmolLM2-135M-Instruct and benchmark
# it against vanilla decoding, HF generate and HF prompt-lookup decoding on MT-bench first turns.
# (Later issues replace this with the full distill -> train -> tune -> serve pipeline.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HEAD_DIR="${HEAD_DIR:-runs/heads/eagle-fresh}"
.venv/bin/koala head init --type eagle --num-layers 1 --target smollm2 --out "$HEAD_DIR"
.venv/bin/koala bench --target smollm2 --drafter "$HEAD_DIR" --per-category 1 --max-new-tokens "${MAX_NEW_TOKENS:-64}" \
    --json runs/bench.json "$@"
