#!/usr/bin/env python
"""Tokens/s of Megatron-LM's own pretrain_gpt.py: stock MoE vs --swiftmoe, skewed routing, 2 CPU ranks.

One command runs three, one after the other: Megatron's static expert parallelism over all
ranks (EP = ranks, the layout SwiftMoE replaces), Megatron with every expert on every rank
(EP 1), and --swiftmoe, on a patched copy of a Megatron-LM checkout, with
the same flags and the same skewed router (a bias added to the router weights after the model
is built, identically in both runs, so that one expert draws about half the tokens; no aux
loss, so the skew stays). It prints each run's median time per iteration after warm-up, tokens/s,
the ratio, and SwiftMoE's per-rank load against static expert parallelism on the same routing.

    python scripts/bench_megatron_lm.py [--megatron-lm DIR] [--iters 12] [--nproc 2]

A benchmark, not a test: figures are measured, nothing is asserted.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.megatron_lm import CPU_FLAGS, checkout, environment  # noqa: E402

SKEWED_LAUNCHER = '''\
"""pretrain_gpt.py with every router skewed towards expert 0 (bench_megatron_lm.py)."""
import runpy

import torch

import megatron_swiftmoe.megatron_lm  # noqa: F401  (first: its CPU shims precede Megatron's imports)
import gpt_builders

build = gpt_builders.gpt_builder


def skewed(*args, **kwargs):
    model = build(*args, **kwargs)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("router.weight"):
                param[0] += {strength} * param.abs().mean() * torch.sign(param.mean(0))
    return model


gpt_builders.gpt_builder = skewed
runpy.run_path("pretrain_gpt.py", run_name="__main__")
'''


def model_flags(args) -> list[str]:
    return [
        "--num-layers", "2", "--hidden-size", "256", "--ffn-hidden-size", "1024", "--num-attention-heads", "4",
        "--seq-length", "256", "--max-position-embeddings", "256", "--micro-batch-size", "4",
        "--global-batch-size", str(4 * args.nproc), "--train-iters", str(args.iters), "--lr", "1e-4",
        "--lr-decay-style", "constant", "--num-experts", "8", "--moe-router-topk", "1", "--moe-router-pre-softmax",
        "--moe-aux-loss-coeff", "0", "--disable-bias-linear", "--mock-data", "--tokenizer-type", "NullTokenizer",
        "--vocab-size", "1024", "--split", "98,2,0", "--log-interval", "1", "--eval-interval", "100000",
        "--eval-iters", "0", "--hidden-dropout", "0", "--attention-dropout", "0",
    ]


def run(tree: Path, args, extra: list[str]) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
               "swiftmoe_skewed_launcher.py", *CPU_FLAGS, *model_flags(args), *extra]
    done = subprocess.run(command, cwd=tree, env=environment(tree), capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def median_ms(output: str, warmup: int) -> float:
    times = [float(t) for t in re.findall(r"elapsed time per iteration \(ms\): ([0-9.]+)", output)]
    if len(times) <= warmup:
        sys.exit(f"only {len(times)} iterations logged; raise --iters above --warmup {warmup}")
    return statistics.median(times[warmup:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megatron-lm", default=None, help="Megatron-LM checkout (default: $MEGATRON_LM_DIR or "
                        "../shared/megatron-lm/core_v0.16.1); copied, never written")
    parser.add_argument("--iters", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--slots-per-rank", type=int, default=6, help="SwiftMoE slots (8 experts on 2 ranks: 6)")
    parser.add_argument("--skew", type=float, default=3.0, help="router bias towards expert 0")
    args = parser.parse_args()
    if args.megatron_lm:
        import os

        os.environ["MEGATRON_LM_DIR"] = args.megatron_lm
    with tempfile.TemporaryDirectory() as tmp:
        tree = checkout(Path(tmp))
        (tree / "swiftmoe_skewed_launcher.py").write_text(SKEWED_LAUNCHER.format(strength=args.skew))
        static = run(tree, args, ["--expert-model-parallel-size", str(args.nproc)])
        replicated = run(tree, args, [])
        swift = run(tree, args, ["--swiftmoe", "--swiftmoe-slots-per-rank", str(args.slots_per_rank)])
    tokens = 4 * args.nproc * 256
    stock_ms, ep1_ms, swift_ms = (median_ms(out, args.warmup) for out in (static, replicated, swift))
    loads = re.findall(r"max/mean rank load per micro-batch: ([0-9.]+) \(static EP: ([0-9.]+)\)", swift)[args.warmup * 2:]
    print(f"Megatron-LM pretrain_gpt.py, {args.nproc} CPU ranks, 8 experts top-1, skewed router, "
          f"median of iterations {args.warmup + 1}..{args.iters}")
    print(f"{'run':<28}{'ms/iter':>10}{'tokens/s':>12}")
    for name, ms in ((f"stock MoE, EP {args.nproc}", stock_ms), ("stock MoE, EP 1", ep1_ms), ("--swiftmoe", swift_ms)):
        print(f"{name:<28}{ms:>10.1f}{tokens / ms * 1000:>12.0f}")
    print(f"speed-up over stock EP {args.nproc} (its ms / swiftmoe ms): {stock_ms / swift_ms:.3f}; "
          f"over EP 1: {ep1_ms / swift_ms:.3f}")
    if loads:
        ours = statistics.mean(float(a) for a, _ in loads)
        static = statistics.mean(float(b) for _, b in loads)
        print(f"rank load max/mean: SwiftMoE {ours:.3f}, static expert parallelism on the same routing {static:.3f}")


if __name__ == "__main__":
    main()
