#!/usr/bin/env bash
# One command from a fresh clone: install (CPU), build the default corpus + tokenizer + dataset,
# train a small GPT-MoE with SwiftMoE on 2 CPU ranks, and plot expert popularity vs. replicas.
#   bash scripts/quickstart.sh [extra pretrain_gpt flags, e.g. --train-iters 100]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
RUN_DIR=${RUN_DIR:-runs/quickstart}
mkdir -p "$RUN_DIR"
.venv/bin/torchrun --standalone --nproc-per-node 2 -m megatron_swiftmoe.pretrain_gpt \
    --config configs/tiny_cpu.yaml --metrics-path "$RUN_DIR/metrics.jsonl" "$@"
.venv/bin/python scripts/plot_run.py "$RUN_DIR/metrics.jsonl" --out "$RUN_DIR/swiftmoe_load.png"
