"""Time SwiftMoE placement planning and compare placement balance.

One rank runs replica_counts + place (once per step) and rank_plan (once per micro-batch)
per MoE layer; split_plan (the full [N, N*S] matrix) is timed separately for reference.

    python scripts/bench_placement.py --experts 256 --ranks 1024 --slots-per-rank 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_swiftmoe.core.placement import (  # noqa: E402
    check_layout,
    place,
    place_contiguous,
    rank_loads,
    replica_counts,
    rank_plan,
    split_plan,
)


def _time(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    fn()  # warm-up: first-call allocations and lazy init are not per-step costs
    ms = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t0) * 1e3)
    ms.sort()
    return statistics.median(ms), ms[min(len(ms) - 1, int(0.9 * len(ms)))]


def _zipf_tokens(experts: int, ranks: int, pairs_per_rank: int, skew: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    prob = torch.arange(1, experts + 1, dtype=torch.float64).pow(-skew)
    prob = prob[torch.randperm(experts, generator=g)]  # hot experts anywhere, not just id 0
    prob /= prob.sum()
    noise = 0.5 + torch.rand(ranks, experts, generator=g, dtype=torch.float64)
    return (prob * noise * pairs_per_rank).round().to(torch.int64)


def _balance(name: str, loads: torch.Tensor | None) -> None:
    if loads is None:
        print(f"  {name:<11} n/a (fewer experts than ranks)")
        return
    mx, mean = loads.max().item(), loads.mean().item()
    print(f"  {name:<11} max {mx:12.1f}  mean {mean:12.1f}  max/mean {mx / mean:6.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--ranks", type=int, default=1024)
    ap.add_argument("--slots-per-rank", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--skew", type=float, default=1.0, help="Zipf exponent of expert popularity")
    ap.add_argument("--pairs-per-rank", type=int, default=32768, help="routed (token, expert) pairs per rank")
    ap.add_argument("--rank", type=int, default=0, help="rank whose send/recv counts are timed")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)  # one core: what a rank can spare next to its training step

    e, n, s = args.experts, args.ranks, args.slots_per_rank
    check_layout(e, n, s)
    tokens = _zipf_tokens(e, n, args.pairs_per_rank, args.skew, args.seed)
    popularity = tokens.sum(0)

    def per_rank_step() -> None:
        counts = replica_counts(popularity, n * s)
        placement = place(popularity, counts, n, s)
        rank_plan(tokens, placement, args.rank)

    counts = replica_counts(popularity, n * s)
    placement = place(popularity, counts, n, s)
    print(f"E={e} N={n} S={s} zipf={args.skew} pairs/rank={args.pairs_per_rank} "
          f"torch={torch.__version__} threads={torch.get_num_threads()} repeats={args.repeats}")
    rows = {
        "replica_counts": lambda: replica_counts(popularity, n * s),
        "place": lambda: place(popularity, counts, n, s),
        "rank_plan": lambda: rank_plan(tokens, placement, args.rank),
        "one rank/step (all 3)": per_rank_step,
        "split_plan [N, N*S]": lambda: split_plan(tokens, placement),
    }
    for name, fn in rows.items():
        med, p90 = _time(fn, args.repeats)
        print(f"  {name:<22} median {med:8.3f} ms   p90 {p90:8.3f} ms")

    print("expected rank load (tokens):")
    _balance("place", rank_loads(popularity, placement))
    _balance("contiguous", rank_loads(popularity, place_contiguous(counts, n, s)))
    static = None
    if e >= n:
        owner = torch.arange(e) * n // e
        static = torch.zeros(n, dtype=torch.float64).index_add_(0, owner, popularity.to(torch.float64))
    _balance("static EP", static)


if __name__ == "__main__":
    main()
