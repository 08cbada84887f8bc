#!/usr/bin/env bash
# Test-only: a second environment, .venv-mcore019, with megatron-core 0.19.2 on this machine's
# Python 3.11, so that CI runs the suite against both API generations (0.16 and 0.19).
# megatron-core >= 0.17 declares Python >= 3.12, but the 0.19.2 wheel is built for cp311: it
# installs with --ignore-requires-python, needs triton (imported at module level by
# megatron/core/transformer/moe/paged_stash.py) and, for megatron.training, typing.override
# (added in Python 3.12; taken from typing_extensions here). Users on Python 3.12 simply
# `pip install megatron-core` — nothing of this applies to them.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
ENV=.venv-mcore019
[ -x $ENV/bin/python ] || "$PYTHON" -m venv $ENV
$ENV/bin/python -m pip install --quiet --upgrade pip
if ! $ENV/bin/python -c "import torch" 2>/dev/null; then
    $ENV/bin/python -m pip install --quiet "torch==2.13.0"
fi
$ENV/bin/python -m pip install --quiet --no-deps --ignore-requires-python "megatron-core==0.19.2"
$ENV/bin/python -m pip install --quiet numpy packaging triton typing_extensions
$ENV/bin/python -m pip install --quiet -e ".[test,megatron-lm]"
SITE=$($ENV/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo 'import typing, typing_extensions; typing.override = getattr(typing, "override", typing_extensions.override)' \
    > "$SITE/swiftmoe_typing_override.pth"
$ENV/bin/python -W ignore -c "import torch, megatron.core, megatron.training; print(f'ready: torch {torch.__version__}, megatron-core {megatron.core.__version__} (test environment)')"
