#!/usr/bin/env bash
# Creates ./.venv with everything the project needs on a CPU machine (idempotent).
# CPU torch first: an unpinned torch would pull several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi
.venv/bin/python -m pip install --quiet -e ".[test,plot,megatron-lm]"
.venv/bin/python -W ignore -c "import torch, megatron.core; print(f'ready: torch {torch.__version__}, megatron-core {megatron.core.__version__}')"
