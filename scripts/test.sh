#!/usr/bin/env bash
# Set up and run the whole test suite (slow tests on the real SmolLM2 target included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
