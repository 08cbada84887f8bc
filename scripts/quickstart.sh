#!/usr/bin/env bash
# One command from a fresh clone: install (CPU), build the default corpus + tokenizer + dataset,
# train a small GPT-MoE with SwiftMoE on 2 CPU ranks, and plot expert popularity vs. replicas.
#   bash scripts/quickstart.sh [extra pretrain_gpt flags, e.g. --train-iters 100 or --no-swiftmoe]
# Every run writes its own directory, runs/quickstart/<date>-<time>-<swiftmoe|static>/ (metrics.jsonl,
# swiftmoe_load.png), and runs/quickstart/latest points to the newest. QUICKSTART_RUNS=DIR puts them
# under DIR instead of runs/quickstart; RUN_DIR=DIR names one run's directory.
# SWIFTMOE_PYTHON=/path/to/python uses that environment as it is (no setup).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${SWIFTMOE_PYTHON:-}" ]; then
    PY=$SWIFTMOE_PYTHON
else
    bash scripts/setup_env.sh
    PY=.venv/bin/python
fi

STRATEGY=swiftmoe  # configs/tiny_cpu.yaml has swiftmoe: true; the last of --swiftmoe / --no-swiftmoe wins
for arg in "$@"; do
    case "$arg" in
        --swiftmoe) STRATEGY=swiftmoe ;;
        --no-swiftmoe) STRATEGY=static ;;
    esac
done
RUNS=${QUICKSTART_RUNS:-runs/quickstart}
if [ -z "${RUN_DIR:-}" ]; then
    RUN_DIR=$RUNS/$(date +%Y%m%d-%H%M%S)-$STRATEGY
    base=$RUN_DIR suffix=1
    while [ -e "$RUN_DIR" ]; do RUN_DIR=$base.$((suffix++)); done  # two runs in one second
fi
mkdir -p "$RUN_DIR"
[ "$(dirname "$RUN_DIR")" = "$RUNS" ] && ln -sfn "$(basename "$RUN_DIR")" "$RUNS/latest"
TITLE="quickstart, $([ "$STRATEGY" = swiftmoe ] && echo SwiftMoE || echo 'static expert parallelism (--no-swiftmoe)')"

"$PY" -m torch.distributed.run --standalone --nproc-per-node 2 -m megatron_swiftmoe.pretrain_gpt \
    --config configs/tiny_cpu.yaml --metrics-path "$RUN_DIR/metrics.jsonl" "$@"
"$PY" scripts/plot_run.py "$RUN_DIR/metrics.jsonl" --out "$RUN_DIR/swiftmoe_load.png" --title "$TITLE"
echo "run directory: $RUN_DIR"
