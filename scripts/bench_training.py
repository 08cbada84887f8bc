"""Wall-clock training benchmark: SwiftMoE (dropless) vs Megatron's static dropless EP, 2 CPU ranks.

What is measured
    The same training run -- same model, seed, data and initial weights -- launched with
    ``torchrun -m megatron_swiftmoe.pretrain_gpt`` once with ``--swiftmoe`` (dropless, S slots
    per rank) and once with ``--no-swiftmoe`` (Megatron static expert parallelism, E/N experts
    per rank, dropless), alternating A B A B ... (default 2 rounds) so that machine noise hits
    both. Both train exactly the same math (the script checks that their losses agree), so they
    do the same work; only where the expert work runs differs.

    Routing skew comes from training itself: the aux-loss coefficient is 0 (default), so the
    router drifts towards a few experts as training proceeds. There is no flag that forces a
    skew; the skew obtained is measured and printed: the mean (over iterations after warm-up and
    MoE layers) of max/mean rank load that static placement has on this routing
    (``static_tokens_per_rank`` in the metrics), and the max/mean load each run really had
    (``tokens_per_rank``).

    Per run: tokens/s = median over the iterations after --warmup-iters of the metrics'
    ``tokens_per_s`` (global batch x sequence / iteration wall time), plus the median iteration,
    forward-backward and optimizer times. Summary: median over runs per strategy, the ratio
    SwiftMoE / static (> 1: SwiftMoE faster) overall and per round, and the load average of the
    machine before and after (a shared machine makes wall-clock numbers noisy).

    Default config: a model where expert compute matters on CPU -- 4 layers, all MoE, hidden 256,
    ffn 1024, 4 heads, 8 experts top-2, sequence 128, micro-batch 8 per rank (global batch 16),
    60 iterations (20 of warm-up), S = 1.5 E/N = 6 slots per rank (4 spare slots for replicas),
    1 thread per rank. Prints measured figures only; no target is enforced.

    python scripts/bench_training.py
    python scripts/bench_training.py --rounds 3 --topk 1 --hidden-size 128 --ffn-hidden-size 512
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]


def read_metrics(path: Path) -> list[dict]:
    by_iteration = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "iteration" in record:
            by_iteration[int(record["iteration"])] = record
    return [by_iteration[i] for i in sorted(by_iteration)]


def imbalance(records: list[dict], key: str) -> Optional[float]:
    """Mean over iterations and MoE layers of max/mean rank load."""
    values = []
    for record in records:
        for layer in record["layers"]:
            loads = layer[key]
            mean = sum(loads) / len(loads)
            values.append(max(loads) / mean if mean else 1.0)
    return statistics.mean(values) if values else None


def hottest_share(records: list[dict]) -> Optional[float]:
    """Mean over iterations and layers of the hottest expert's share of the routed pairs."""
    values = []
    for record in records:
        for layer in record["layers"]:
            tokens = layer["tokens_per_expert"]
            if sum(tokens):
                values.append(max(tokens) / sum(tokens))
    return statistics.mean(values) if values else None


def median(records: list[dict], key: str) -> Optional[float]:
    values = [r[key] for r in records if r.get(key) is not None]
    return statistics.median(values) if values else None


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def command(args: argparse.Namespace, swiftmoe: bool, metrics: Path) -> list[str]:
    flags = [
        "--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
        "--num-attention-heads", str(args.num_heads), "--ffn-hidden-size", str(args.ffn_hidden_size),
        "--seq-length", str(args.seq_length), "--micro-batch-size", str(args.micro_batch_size),
        "--global-batch-size", str(args.micro_batch_size * args.ranks),
        "--num-experts", str(args.num_experts), "--moe-router-topk", str(args.topk),
        *(["--moe-router-pre-softmax"] if args.topk == 1 else []),
        "--moe-aux-loss-coeff", f"{args.aux_loss_coeff:g}", "--hidden-dropout", "0", "--attention-dropout", "0",
        "--lr", f"{args.lr:g}", "--min-lr", f"{args.lr / 10:g}", "--lr-decay-style", "cosine",
        "--lr-warmup-iters", str(min(5, args.train_iters // 4)), "--seed", "1234", "--train-iters", str(args.train_iters), "--eval-iters", "0",
        "--log-interval", str(args.train_iters), "--no-progress",
        "--swiftmoe-slots-per-rank", str(args.slots_per_rank), "--swiftmoe" if swiftmoe else "--no-swiftmoe",
        "--metrics-path", str(metrics), *shlex.split(args.extra_args or ""),
    ]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.ranks),
            "-m", "megatron_swiftmoe.pretrain_gpt", *flags]


def run_once(args: argparse.Namespace, label: str, swiftmoe: bool, round_index: int) -> Optional[dict]:
    run_dir = Path(args.out_dir) / f"{label}-{round_index}"
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = run_dir / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads_per_rank), "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p)
    start = time.time()
    with open(run_dir / "train.log", "w") as out, open(run_dir / "train.err", "w") as err:
        try:
            rc = subprocess.run(command(args, swiftmoe, metrics), stdout=out, stderr=err, cwd=REPO, env=env,
                                timeout=args.run_timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    wall = time.time() - start
    records = read_metrics(metrics) if metrics.is_file() else []
    if rc != 0 or len(records) < args.train_iters:
        text = (run_dir / "train.err").read_text(errors="replace")
        errors = []
        for line in text.splitlines():
            line = line.strip()
            if ("error:" in line.lower() or line.split(":")[0].endswith(("Error", "Exception"))) and \
                    not line.startswith("error_file") and line not in errors:
                errors.append(line)
        print(f"  {label} round {round_index}: FAILED (exit code {rc}, {len(records)} iterations) after "
              f"{wall:.0f} s (log: {run_dir / 'train.err'})", flush=True)
        print("\n".join("    " + l for l in errors[-8:] or text[-2000:].splitlines()[-20:]), flush=True)
        return None
    after = records[args.warmup_iters:]
    result = dict(
        label=label, round=round_index, wall_s=wall, records=records,
        tokens_per_s=median(after, "tokens_per_s"), iter_s=median(after, "iter_time_s"),
        fwd_bwd_s=median(after, "time_forward_backward_s"), opt_s=median(after, "time_optimizer_s"),
        measured_imbalance=imbalance(after, "tokens_per_rank"), static_imbalance=imbalance(after, "static_tokens_per_rank"),
        hottest=hottest_share(after),
    )
    print(f"  {label:8s} round {round_index}: {result['tokens_per_s']:8.0f} tokens/s | iteration "
          f"{1e3 * result['iter_s']:7.1f} ms (fwd+bwd {1e3 * result['fwd_bwd_s']:7.1f}, optimizer "
          f"{1e3 * result['opt_s']:6.1f}) | rank max/mean load {result['measured_imbalance']:.2f} "
          f"(static placement on this routing {result['static_imbalance']:.2f}) | hottest expert "
          f"{100 * result['hottest']:.0f}% of pairs | run {wall:.0f} s", flush=True)
    return result


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring for what is measured.")
    p.add_argument("--rounds", type=int, default=2, help="A B pairs (SwiftMoE, static), alternating")
    p.add_argument("--train-iters", type=int, default=60)
    p.add_argument("--warmup-iters", type=int, default=20, help="iterations left out of the medians")
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--ffn-hidden-size", type=int, default=1024)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--aux-loss-coeff", type=float, default=0.0, help="0: routing skews as training proceeds")
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--slots-per-rank", type=int, default=None, help="default ceil(1.5 E / N)")
    p.add_argument("--threads-per-rank", type=int, default=1)
    p.add_argument("--extra-args", default="", help="more pretrain_gpt flags for both (one string)")
    p.add_argument("--out-dir", default=str(REPO / "runs" / "bench_training"))
    p.add_argument("--run-timeout", type=float, default=1800)
    args = p.parse_args(argv)
    if args.slots_per_rank is None:
        args.slots_per_rank = math.ceil(1.5 * args.num_experts / args.ranks)
    if args.warmup_iters >= args.train_iters:
        p.error("--warmup-iters must be below --train-iters")

    n, s, e = args.ranks, args.slots_per_rank, args.num_experts
    print(f"bench_training: {args.num_layers} MoE layers, hidden {args.hidden_size}, ffn {args.ffn_hidden_size}, "
          f"{e} experts top-{args.topk}, aux-loss {args.aux_loss_coeff:g}, sequence {args.seq_length}, micro-batch "
          f"{args.micro_batch_size} x {n} ranks, {args.train_iters} iterations ({args.warmup_iters} warm-up), "
          f"SwiftMoE S = {s} slots/rank ({n * s} slots for {e} experts), {args.threads_per_rank} thread(s)/rank, "
          f"{args.rounds} rounds A B (swiftmoe, static)", flush=True)
    print(f"load average before: {loadavg()}  (this machine: {os.cpu_count()} CPUs)", flush=True)
    start = time.time()
    results: dict[str, list[dict]] = {"swiftmoe": [], "static": []}
    pairs = []
    for round_index in range(1, args.rounds + 1):
        a = run_once(args, "swiftmoe", True, round_index)
        b = run_once(args, "static", False, round_index)
        for label, result in (("swiftmoe", a), ("static", b)):
            if result:
                results[label].append(result)
        if a and b:
            pairs.append(a["tokens_per_s"] / b["tokens_per_s"])
    print(f"load average after:  {loadavg()}; benchmark took {(time.time() - start) / 60:.1f} min", flush=True)
    if not results["swiftmoe"] or not results["static"]:
        print("no comparison: a strategy has no successful run")
        return 1

    print("\nsummary (median over runs of each run's median after warm-up)")
    summary = {}
    for label, runs in results.items():
        summary[label] = {k: statistics.median(r[k] for r in runs)
                          for k in ("tokens_per_s", "iter_s", "fwd_bwd_s", "opt_s", "measured_imbalance",
                                    "static_imbalance", "hottest")}
        m = summary[label]
        print(f"  {label:8s}: {m['tokens_per_s']:8.0f} tokens/s, {1e3 * m['iter_s']:7.1f} ms/iteration "
              f"(fwd+bwd {1e3 * m['fwd_bwd_s']:.1f}, optimizer {1e3 * m['opt_s']:.1f}), rank max/mean load "
              f"{m['measured_imbalance']:.2f}  [{len(runs)} run(s)]")
    skew = statistics.mean(r["static_imbalance"] for rs in results.values() for r in rs)
    hot = statistics.mean(r["hottest"] for rs in results.values() for r in rs)
    print(f"  routing skew obtained: static placement max/mean rank load {skew:.2f} (1.00 = balanced, "
          f"{n:.2f} = all on one rank); hottest expert {100 * hot:.0f}% of routed pairs (uniform: "
          f"{100 / e:.0f}%)")
    a, b = results["swiftmoe"][0]["records"], results["static"][0]["records"]
    diff = max(abs(x["lm_loss"] - y["lm_loss"]) for x, y in zip(a, b))
    print(f"  same training: max |lm loss difference| SwiftMoE vs static = {diff:.2e} "
          f"({'identical math, different layout' if diff < 1e-3 else 'WARNING: the runs diverged'})")
    ratio = summary["swiftmoe"]["tokens_per_s"] / summary["static"]["tokens_per_s"]
    print(f"  ratio SwiftMoE / static tokens/s = {ratio:.3f}" + (
        f"  (per round: {', '.join(f'{x:.3f}' for x in pairs)})" if pairs else ""))
    print(f"  SwiftMoE was {'FASTER' if ratio > 1 else 'SLOWER'} than static EP by {abs(ratio - 1) * 100:.1f}% "
          "on this machine (wall clock; see the load averages above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
