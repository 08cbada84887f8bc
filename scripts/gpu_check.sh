#!/usr/bin/env bash
# The GPU check: one command, about 8 minutes on one GPU (world size 1, NCCL), bf16.
#   1. SwiftMoE's slots: the kernel --swiftmoe-grouped-gemm auto / on picks here (Transformer
#      Engine, torch._grouped_mm or the loop, and why), then grouped vs loop TFLOP/s
#      (scripts/bench_slot_gemm.py);
#   2. this project's trainer, GPT-Small-shaped MoE (configs/gpt_small_moe.yaml), grouped GEMM:
#      tokens/s and peak GPU memory;
#   3. with several GPUs only (one rank each, up to 8): the exposed expert-communication time
#      with NCCL, SwiftMoE's expert traffic synchronous vs overlapped (scripts/bench_overlap.py:
#      how long the compute stream waits for the expert collectives, per iteration); on one GPU
#      it says so and skips;
#   4. Megatron-LM's own pretrain_gpt.py (patched copy of $MEGATRON_LM_DIR) with --swiftmoe and
#      --moe-grouped-gemm, same shape: tokens/s and Megatron's memory report.
#
#   bash scripts/gpu_check.sh            (MEGATRON_LM_DIR: a Megatron-LM checkout; step 4 is
#                                         skipped, saying so, when there is none)
#
# Needs torch with CUDA, megatron-core (>= 0.16.1) and this package importable, e.g.
# PYTHONPATH=$PWD after `pip install megatron-core` or from carried wheels; Megatron-LM's
# training code also wants six, regex, pydantic and psutil (`pip install -e .[megatron-lm]`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT_DIR=${GPU_CHECK_OUT:-runs/gpu_check}
mkdir -p "$OUT_DIR"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('GPU:', torch.cuda.get_device_name(), '| torch', torch.__version__)"
"$PY" -c "import megatron.core; print('megatron-core', megatron.core.__version__)"

echo "== 1. slot experts: kernel choice, grouped GEMM vs loop (bf16)"
"$PY" scripts/bench_slot_gemm.py --slots 8 --tokens 65536 --hidden 768 --ffn 3072

SHAPE=(--config configs/gpt_small_moe.yaml --mock-data --train-iters 40 --log-interval 10 --eval-iters 0
       --swiftmoe --swiftmoe-slots-per-rank 20 --swiftmoe-grouped-gemm on --no-progress)
echo "== 2. this project's trainer, 1 GPU, GPT-Small MoE (16 experts, top-1), bf16, grouped GEMM"
"$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m megatron_swiftmoe.pretrain_gpt "${SHAPE[@]}" \
    --metrics-path "$OUT_DIR/trainer_metrics.jsonl" > "$OUT_DIR/trainer.log" 2>&1 || { tail -40 "$OUT_DIR/trainer.log"; exit 1; }
"$PY" - "$OUT_DIR/trainer_metrics.jsonl" <<'PY'
import json, statistics, sys
records = [json.loads(line) for line in open(sys.argv[1])][10:]  # after 10 warm-up iterations
print(f"trainer: {statistics.median(r['tokens_per_s'] for r in records):.0f} tokens/s (median of iterations "
      f"11..{len(records) + 10}), peak GPU memory {max(r.get('peak_memory_bytes', 0) for r in records) / 2**30:.2f} GiB")
PY

GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
echo "== 3. exposed expert communication with NCCL: synchronous vs overlapped expert traffic"
if [ "$GPUS" -lt 2 ]; then
    echo "skipped: this machine has $GPUS GPU; the measurement needs at least 2 (one rank per GPU)"
else
    RANKS=$(( GPUS < 8 ? GPUS : 8 ))
    "$PY" scripts/bench_overlap.py --backend nccl --nproc "$RANKS" --bf16 --layers 8 --hidden 1024 --ffn 4096 \
        --experts $(( 2 * RANKS )) --slots 4 --seq 1024 --micro-batch-size 4 --micro-batches 4 --iters 10
fi

echo "== 4. Megatron-LM pretrain_gpt.py --swiftmoe, 1 GPU, same shape, bf16, --moe-grouped-gemm"
if [ -z "${MEGATRON_LM_DIR:-}" ] || [ ! -f "$MEGATRON_LM_DIR/pretrain_gpt.py" ]; then
    echo "skipped: set MEGATRON_LM_DIR to a Megatron-LM checkout (tag core_v0.16.1 or core_v0.19.0)"
    exit 0
fi
TREE=$(mktemp -d)/megatron-lm
cp -r "$MEGATRON_LM_DIR" "$TREE"
bash patches/apply.sh "$TREE"
(cd "$TREE" && PYTHONPATH="$TREE:$PYTHONPATH" "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 pretrain_gpt.py \
    --transformer-impl local --num-layers 12 --hidden-size 768 --ffn-hidden-size 3072 --num-attention-heads 12 \
    --seq-length 512 --max-position-embeddings 512 --micro-batch-size 64 --global-batch-size 64 --train-iters 40 \
    --lr 3e-4 --lr-decay-style constant --num-experts 16 --moe-router-topk 1 --moe-router-pre-softmax \
    --moe-aux-loss-coeff 1e-5 --moe-grouped-gemm --disable-bias-linear --bf16 --use-distributed-optimizer \
    --mock-data --tokenizer-type NullTokenizer --vocab-size 50257 --split 98,2,0 --log-interval 10 \
    --eval-interval 100000 --eval-iters 0 --swiftmoe --swiftmoe-slots-per-rank 20) > "$OUT_DIR/megatron_lm.log" 2>&1 \
    || { tail -40 "$OUT_DIR/megatron_lm.log"; exit 1; }
"$PY" - "$OUT_DIR/megatron_lm.log" <<'PY'
import re, statistics, sys
text = open(sys.argv[1]).read()
ms = [float(t) for t in re.findall(r"elapsed time per iteration \(ms\): ([0-9.]+)", text)][1:]
print(f"Megatron-LM --swiftmoe: {64 * 512 / statistics.median(ms) * 1000:.0f} tokens/s (median of logged intervals "
      f"after the first), memory: {(re.findall(r'memory \(MB\).*', text) or ['not reported'])[-1]}")
for line in re.findall(r"^ moe layer  0 .*$", text, re.M)[-1:]:
    print("last load line:", line.strip())
PY
