"""SwiftMoE placement and split: planning time, balance vs an EPLB-style reference, trace replay.

Three parts (any combination; default: timing only):

  python scripts/bench_placement.py                        # timing, E=256 N=1024 S=2
  python scripts/bench_placement.py --families             # balance over popularity families
  python scripts/bench_placement.py --trace runs/q/metrics.jsonl   # realised loads on a real run

Timing (``--experts --ranks --slots-per-rank``): one rank's per-step planning (``load_counts`` +
``place``) and its per-layer, per-micro-batch share of the split (``rank_plan``) under both
split rules, on one thread, as process CPU time (the machine may be shared: CPU time does not
count what other processes took). ``replica`` is the split as it was before the rank split.

Families: popularity vectors (zipf exponents 0.5-2.0, lognormal sigma 0.5-2.0, one-hot,
uniform) for E in 8..256, N in 2..1024, S in 1..16 with N*S >= E. Per family, the max/mean
expected rank load (every replica of e takes popularity_e / replicas_e: the equal split) of

  * ours:        ``load_counts`` + ``place`` (this project's default);
  * EPLB-style:  a reference written here from the published description of DeepSeek's EPLB:
                 replicate the expert with the highest load per replica, one replica at a time,
                 then balanced packing: replicas, heaviest first, each to the lightest rank that
                 still has a free slot (equal slot counts per rank);
  * contiguous:  the paper's counts laid out expert by expert (``place_contiguous``);

with ours/EPLB and ours/LB; then the same for the rank split (the exact min-max split of the
same popularity, as integer pairs, over our placement and over the EPLB-style one). Note on
the equal split: EPLB's packing may put two copies of an expert on one rank, which gives that
rank a finer share under the equal split; ``place`` avoids such copies while another rank can
take one (under the default rank split they are one pool: a wasted host).

LB, a lower bound on the largest rank load of ANY placement of N x S slots under either
split: max(P / N, lambda*), P the total popularity and lambda* the smallest achievable
max_e popularity_e / min(replicas_e, N) over all replica counts (computed exactly by
``load_counts``): some host of e takes at least p_e / min(c_e, N) of it.

Trace (metrics JSONL files of pretrain_gpt, with ``microbatch_tokens_per_expert``): per MoE
layer and iteration i >= 2, the placement planned from iteration i-1's popularity (as the
optimizer does), then for every micro-batch of iteration i the *realised* rank totals after
the split (``rank_plan_with_totals``; they depend only on each expert's pairs of the micro-
batch, so the pairs are spread evenly over source ranks), under both rules, for our placement,
the EPLB-style one and contiguous; and static EP (E/N consecutive experts per rank).
``--replay-ranks/--replay-slots`` replay the same global routing on another layout.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_swiftmoe.core.placement import (  # noqa: E402
    check_layout,
    load_counts,
    place,
    place_contiguous,
    rank_loads,
    rank_plan,
    rank_plan_with_totals,
    replica_counts,
)

FAMILIES = ("zipf-0.5", "zipf-1.0", "zipf-1.5", "zipf-2.0", "lognormal-0.5", "lognormal-1.0",
            "lognormal-1.5", "lognormal-2.0", "one-hot", "uniform")
EXPERTS = (8, 16, 32, 64, 128, 256)
RANKS = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
SLOTS = (1, 2, 4, 8, 16)


def eplb_reference(popularity: torch.Tensor, num_ranks: int, slots_per_rank: int) -> torch.Tensor:
    """EPLB-style placement [N, S] from its description (see the module docstring)."""
    p = popularity.to(torch.float64).tolist()
    counts = [1] * len(p)
    heap = [(-v, i) for i, v in enumerate(p)]  # highest load per replica first, ties lowest id
    heapq.heapify(heap)
    for _ in range(num_ranks * slots_per_rank - len(p)):
        _, i = heapq.heappop(heap)
        counts[i] += 1
        heapq.heappush(heap, (-p[i] / counts[i], i))
    replicas = sorted(((p[i] / c, i) for i, c in enumerate(counts) for _ in range(c)), key=lambda t: (-t[0], t[1]))
    ranks = [(0.0, r) for r in range(num_ranks)]
    rows: list[list[int]] = [[] for _ in range(num_ranks)]
    for weight, expert in replicas:
        load, r = heapq.heappop(ranks)
        rows[r].append(expert)
        if len(rows[r]) < slots_per_rank:
            heapq.heappush(ranks, (load + weight, r))
    return torch.tensor([sorted(row) for row in rows], dtype=torch.int64)


def ours(popularity: torch.Tensor, n: int, s: int) -> torch.Tensor:
    return place(popularity, load_counts(popularity, n, s), n, s)


def contiguous(popularity: torch.Tensor, n: int, s: int) -> torch.Tensor:
    return place_contiguous(replica_counts(popularity, n * s), n, s)


def lower_bound(popularity: torch.Tensor, n: int, s: int) -> float:
    pop = popularity.to(torch.float64)
    counts = load_counts(pop, n, s)
    return max(float(pop.sum()) / n, float((pop / counts.clamp(max=n)).max()))


def popularity_vector(family: str, e: int, g: torch.Generator) -> torch.Tensor:
    """[E] float64, a random permutation of the family's shape (scale irrelevant)."""
    kind, _, arg = family.rpartition("-") if family[-1].isdigit() else (family, "", "")
    if kind == "zipf":
        pop = torch.arange(1, e + 1, dtype=torch.float64).pow(-float(arg))
    elif kind == "lognormal":
        pop = torch.exp(float(arg) * torch.randn(e, generator=g, dtype=torch.float64))
    elif kind == "one-hot":
        pop = torch.zeros(e, dtype=torch.float64)
        pop[0] = 1.0
    else:
        pop = torch.ones(e, dtype=torch.float64)
    return pop[torch.randperm(e, generator=g)]


def split_totals(per_expert: torch.Tensor, placement: torch.Tensor, rule: str) -> torch.Tensor:
    """[N] rank totals of the split of integer pairs per expert [E] (spread over sources)."""
    n = placement.shape[0]
    per_expert = per_expert.to(torch.int64)
    tokens = per_expert // n + (torch.arange(n)[:, None] < per_expert % n).to(torch.int64)
    return rank_plan_with_totals(tokens, placement, 0, rule).totals


def imbalance(loads: torch.Tensor) -> float:
    loads = loads.to(torch.float64)
    mean = float(loads.mean())
    return float(loads.max()) / mean if mean > 0 else 1.0


def _cpu_ms(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    fn()  # warm-up: first-call allocations and lazy init are not per-step costs
    ms = []
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        ms.append((time.thread_time() - t0) * 1e3)
    ms.sort()
    return statistics.median(ms), ms[min(len(ms) - 1, int(0.9 * len(ms)))]


def _zipf_tokens(experts: int, ranks: int, pairs_per_rank: int, skew: float, seed: int, draw: int) -> torch.Tensor:
    """[N, E] pairs: zipf popularity (hot experts anywhere, not just id 0, fixed by ``seed``)
    times uniform noise in [0.5, 1.5) per rank and expert (drawn by ``draw``)."""
    prob = torch.arange(1, experts + 1, dtype=torch.float64).pow(-skew)
    prob = prob[torch.randperm(experts, generator=torch.Generator().manual_seed(seed))]
    prob /= prob.sum()
    noise = 0.5 + torch.rand(ranks, experts, generator=torch.Generator().manual_seed(draw), dtype=torch.float64)
    return (prob * noise * pairs_per_rank).round().to(torch.int64)


def timing(args) -> None:
    e, n, s = args.experts, args.ranks, args.slots_per_rank
    check_layout(e, n, s)
    # The placement is planned from the previous step's popularity: another draw of the routing.
    previous = _zipf_tokens(e, n, args.pairs_per_rank, args.skew, args.seed, 0).sum(0)
    tokens = _zipf_tokens(e, n, args.pairs_per_rank, args.skew, args.seed, 1)
    counts = load_counts(previous, n, s)
    placement = place(previous, counts, n, s)
    print(f"timing: E={e} N={n} S={s} zipf={args.skew} pairs/rank={args.pairs_per_rank} torch={torch.__version__} "
          f"threads={torch.get_num_threads()} repeats={args.repeats} (process CPU time, ms)")
    rows = {
        "load_counts": lambda: load_counts(previous, n, s),
        "place (LPT + swaps)": lambda: place(previous, counts, n, s),
        "  of which LPT": lambda: place(previous, counts, n, s, max_swaps=0),
        "EPLB-style reference": lambda: eplb_reference(previous, n, s),
        "rank_plan, replica split": lambda: rank_plan(tokens, placement, args.rank, "replica"),
        "rank_plan, rank split": lambda: rank_plan(tokens, placement, args.rank, "rank"),
    }
    measured = {}
    for name, fn in rows.items():
        measured[name] = _cpu_ms(fn, args.repeats)
        print(f"  {name:<26} median {measured[name][0]:8.3f}   p90 {measured[name][1]:8.3f}")
    plan = measured["load_counts"][0] + measured["place (LPT + swaps)"][0]
    extra = measured["rank_plan, rank split"][0] - measured["rank_plan, replica split"][0]
    print(f"  planning per layer and step (counts + place): {plan:.3f} ms; rank split costs {extra:+.3f} ms "
          f"per layer and micro-batch over the replica split")
    pop = previous.to(torch.float64)
    print("  expected max/mean (equal split): ours %.4f, EPLB-style %.4f, contiguous %.4f, LB %.4f" % (
        imbalance(rank_loads(pop, placement)), imbalance(rank_loads(pop, eplb_reference(pop, n, s))),
        imbalance(rank_loads(pop, contiguous(pop, n, s))), lower_bound(pop, n, s) / (float(pop.sum()) / n)))
    for rule in ("replica", "rank"):
        print(f"  realised max/mean of this micro-batch, {rule} split: "
              f"{imbalance(rank_plan_with_totals(tokens, placement, 0, rule).totals):.4f}")


def families(args) -> None:
    shapes = [(e, n, s) for e in EXPERTS for n in RANKS for s in SLOTS if n * s >= e and n * s <= args.max_slots]
    print(f"families: {len(shapes)} shapes (E in {EXPERTS}, N in {RANKS}, S in {SLOTS}, E <= N*S <= "
          f"{args.max_slots}) x {args.seeds} seeds per family; max/mean expected rank load; "
          f"LB = max(P/N, lambda*) (module docstring)")
    head = (f"{'':<14} {'':>5} | {'equal split (every replica the same share)':^89} | "
            f"{'rank split (exact min-max of the same popularity)':^50}\n"
            f"{'family':<14} {'cases':>5} | {'ours mean':>9} {'worst':>7} | {'EPLB mean':>9} {'worst':>7} | "
            f"{'contig mean':>11} {'worst':>7} | {'ours/EPLB mean':>14} {'worst':>6} {'worse':>5} | "
            f"{'ours/LB':>7} {'worst':>6} | {'ours mean':>9} {'EPLB mean':>9} {'ours/EPLB':>9} {'worst':>6} "
            f"{'ours/LB':>7} {'worst':>6}")
    print(head)
    print("-" * len(head.splitlines()[1]))
    everything = []
    for family in FAMILIES:
        g = torch.Generator().manual_seed(args.seed)
        rows = []
        for e, n, s in shapes:
            for _ in range(args.seeds):
                pop = popularity_vector(family, e, g)
                mean = float(pop.sum()) / n
                mine, eplb = ours(pop, n, s), eplb_reference(pop, n, s)
                a, b = float(rank_loads(pop, mine).max()), float(rank_loads(pop, eplb).max())
                c = float(rank_loads(pop, contiguous(pop, n, s)).max())
                lb = lower_bound(pop, n, s)
                row = [a / mean, b / mean, c / mean, a / b, a / lb]
                if args.rank_split:  # integer pairs: the same popularity, 1e6 pairs in all
                    pairs = (pop / pop.sum() * 1e6).round()
                    scale = float(pairs.sum()) / n
                    ra, rb = (float(split_totals(pairs, x, "rank").max()) for x in (mine, eplb))
                    row += [ra / scale, rb / scale, ra / rb, ra / max(lower_bound(pairs, n, s), scale)]
                rows.append(row)
        everything += rows
        _family_row(family, rows)
    _family_row("all", everything)


def _family_row(name: str, rows: list[list[float]]) -> None:
    col = list(zip(*rows))
    mean = [statistics.fmean(x) for x in col]
    worst = [max(x) for x in col]
    worse = sum(1 for x in col[3] if x > 1 + 1e-12)
    line = (f"{name:<14} {len(rows):>5} | {mean[0]:9.4f} {worst[0]:7.3f} | {mean[1]:9.4f} {worst[1]:7.3f} | "
            f"{mean[2]:11.4f} {worst[2]:7.3f} | {mean[3]:14.4f} {worst[3]:6.3f} {worse:>5} | "
            f"{mean[4]:7.4f} {worst[4]:6.3f} |")
    if len(col) > 5:
        line += f" {mean[5]:9.4f} {mean[6]:9.4f} {mean[7]:9.4f} {worst[7]:6.3f} {mean[8]:7.4f} {worst[8]:6.3f}"
    print(line)


def trace(args, path: str) -> None:
    records = {}
    with open(path, encoding="utf-8") as file:
        for line in file:
            if line.strip():
                record = json.loads(line)
                records[int(record["iteration"])] = record
    its = [records[i] for i in sorted(records)]
    layers = its[0]["layers"]
    if "microbatch_tokens_per_expert" not in layers[0]:
        raise SystemExit(f"{path}: no microbatch_tokens_per_expert (recorded before the per-micro-batch trace)")
    n = args.replay_ranks or len(layers[0]["tokens_per_rank"])
    s = args.replay_slots or sum(layers[0]["replicas_per_expert"]) // len(layers[0]["tokens_per_rank"])
    e = len(layers[0]["tokens_per_expert"])
    check_layout(e, n, s)
    strategies = {"ours": ours, "EPLB-style": eplb_reference, "contiguous": contiguous}
    realised: dict[tuple[str, str], list[float]] = {(k, r): [] for k in strategies for r in ("replica", "rank")}
    static, expected = [], {k: [] for k in strategies}
    owner = torch.arange(e) // -(-e // n)
    for before, now in zip(its, its[1:]):
        for layer_before, layer in zip(before["layers"], now["layers"]):
            popularity = torch.tensor(layer_before["tokens_per_expert"], dtype=torch.float64)
            for name, planner in strategies.items():
                placement = planner(popularity, n, s)
                expected[name].append(imbalance(rank_loads(torch.tensor(layer["tokens_per_expert"]), placement)))
                for micro in layer["microbatch_tokens_per_expert"]:
                    for rule in ("replica", "rank"):
                        realised[(name, rule)].append(imbalance(split_totals(torch.tensor(micro), placement, rule)))
            for micro in layer["microbatch_tokens_per_expert"]:
                static.append(imbalance(torch.zeros(n, dtype=torch.int64).index_add_(0, owner, torch.tensor(micro))))
    micro_batches = len(static)
    print(f"trace {path}: {len(its)} iterations, {len(layers)} MoE layers, E={e} N={n} S={s}, "
          f"{micro_batches} (layer, micro-batch) splits replayed; max/mean rank totals, mean / worst")
    for name in strategies:
        print(f"  {name:<11} expected (equal split, whole iteration) {statistics.fmean(expected[name]):.4f} / "
              f"{max(expected[name]):.4f} | realised per micro-batch: replica split "
              f"{statistics.fmean(realised[(name, 'replica')]):.4f} / {max(realised[(name, 'replica')]):.4f}, "
              f"rank split {statistics.fmean(realised[(name, 'rank')]):.4f} / {max(realised[(name, 'rank')]):.4f}")
    print(f"  static EP   realised per micro-batch {statistics.fmean(static):.4f} / {max(static):.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--ranks", type=int, default=1024)
    ap.add_argument("--slots-per-rank", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--skew", type=float, default=1.0, help="Zipf exponent of the timing case's popularity")
    ap.add_argument("--pairs-per-rank", type=int, default=32768, help="routed (token, expert) pairs per rank")
    ap.add_argument("--rank", type=int, default=0, help="rank whose send/recv counts are timed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-timing", dest="timing", action="store_false")
    ap.add_argument("--families", action="store_true", help="balance over the popularity families")
    ap.add_argument("--seeds", type=int, default=3, help="popularity vectors per family and shape")
    ap.add_argument("--max-slots", type=int, default=16384, help="skip shapes with more than N*S slots")
    ap.add_argument("--no-rank-split", dest="rank_split", action="store_false",
                    help="skip the rank-split column of --families (the slowest part)")
    ap.add_argument("--trace", nargs="*", default=[], help="metrics JSONL files to replay")
    ap.add_argument("--replay-ranks", type=int, default=None, help="replay traces on N ranks (default: as recorded)")
    ap.add_argument("--replay-slots", type=int, default=None, help="... with S slots per rank (default: as recorded)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # one core: what a rank can spare next to its training step
    if args.timing:
        timing(args)
    if args.families:
        families(args)
    for path in args.trace:
        trace(args, path)


if __name__ == "__main__":
    main()
