#!/usr/bin/env bash
# The main job on the embedded default: set up, then run the whole KOALA pipeline (the cpu-demo preset) on
# SmolLM2-135M-Instruct: distill -> Ray Tune sweep (train + measure 8 heads) -> register the winner -> serve it.
# Extra arguments go to jobs/full_pipeline.py, e.g. `bash scripts/main.sh --config smoke` for a first look.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python jobs/full_pipeline.py --config cpu-demo "$@"
