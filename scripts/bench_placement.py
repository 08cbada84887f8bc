"""SwiftMoE placement and split: planning time, metadata, balance vs an EPLB-style reference and
the exact optimum, trace replay.

  python scripts/bench_placement.py                        # the timing table (issue 17's shapes)
  python scripts/bench_placement.py --families             # balance over popularity families
  python scripts/bench_placement.py --trace runs/q/metrics.jsonl   # realised loads on a real run

Timing: for each shape (E, N, S) (``--shape E,N,S``, repeatable; default: the issue's five), one
rank's per-layer, per-step planning (``load_counts`` + ``place``, and ``split_layout``, which the
split reuses for the whole step) and its per-layer, per-micro-batch split under both rules
(``plan_split`` + its own ``source_sends``: everything but the communication), on one thread, as
process CPU time (the machine may be shared: CPU time does not count what other processes
took); the same on CUDA (events) when a GPU is present. Zipf popularity (exponent ``--skew``),
``--pairs-per-rank`` routed pairs per rank; the placement is planned from one draw and the
micro-batch is another. Also: the metadata one rank receives per layer and micro-batch
(``dispatcher.metadata_bytes``) against the [N, 2, E] all-gather it replaces, and the realised
max/mean of the micro-batch under both rules with the gap to the exact optimum (certified from
below by ``split_lower_bound``).

Families: popularity vectors (zipf 0.5-2.0, lognormal 0.5-2.0, one-hot, uniform) for E in
8..256, N in 2..1024, S in 1..16 with E <= N*S <= --max-slots. Per family:

  * placement: max/mean expected rank load under the equal split (every replica of e takes
    popularity_e / replicas_e) of ours (``load_counts`` + ``place``), an EPLB-style reference
    written here from the published description of DeepSeek's EPLB (replicate the expert with
    the highest load per replica, one replica at a time, then replicas, heaviest first, each to
    the lightest rank with a free slot) and the paper's contiguous layout; ours/EPLB;
  * split (rank rule, ``rank_quota``) of the same popularity as 10^6 integer pairs, over our
    placement and the EPLB-style one: the realised largest rank total (the quotas: every slot
    receives exactly its quota) over the exact optimum. The optimum is bounded from below by
    ``split_lower_bound`` of a long run of ``rank_quota`` (256 rounds), and computed exactly
    by max flows (networkx) where that bound is more than 0.5% below ours (else the gap shown
    is an upper bound).

Trace (metrics JSONL files of pretrain_gpt, with ``microbatch_tokens_per_expert``): per MoE
layer and iteration i >= 2, the placement planned from iteration i-1's popularity (as the
optimizer does), then for every micro-batch of iteration i the realised rank totals of both
rules, for our placement, the EPLB-style one and contiguous; and static EP (E/N consecutive
experts per rank). ``--replay-ranks/--replay-slots`` replay the same global routing on another
layout.
"""

from __future__ import annotations

import argparse
import heapq
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_swiftmoe.core.dispatcher import metadata_bytes  # noqa: E402
from megatron_swiftmoe.core.placement import (  # noqa: E402
    check_layout,
    load_counts,
    place,
    place_contiguous,
    plan_split,
    rank_loads,
    rank_quota,
    replica_counts,
    source_index,
    source_sends,
    split_layout,
    split_lower_bound,
)

SHAPES = ((256, 1024, 2), (256, 1024, 4), (256, 1024, 8), (256, 4096, 4), (512, 4096, 4))
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


def rank_totals(totals: torch.Tensor, placement: torch.Tensor, rule: str) -> torch.Tensor:
    """[N] realised rank totals of the split of integer pairs per expert [E]: each slot
    receives its quota, whatever the sources, so only the totals matter."""
    n = placement.shape[0]
    layout = split_layout(placement, totals.numel())
    own = torch.zeros(n, placement.shape[1], dtype=torch.int64)
    return plan_split(totals.to(torch.int64), own, layout, rule).quota.view(n, -1).sum(1)


def exact_optimum(totals: torch.Tensor, placement: torch.Tensor, ceiling: int) -> int:
    """The smallest largest rank total of any integer split (networkx max flows), searched
    between split_lower_bound of a long rank_quota run and ``ceiling`` (a feasible value)."""
    import networkx as nx

    n, e = placement.shape[0], totals.numel()
    layout = split_layout(placement, e)
    loads = rank_quota(totals, layout, rounds=256).view(n, -1).sum(1)
    lo, hi = int(split_lower_bound(totals, layout, loads.double())), min(ceiling, int(loads.max()))
    grand = int(totals.sum())
    hosts = [sorted(set(torch.nonzero(placement == x)[:, 0].tolist())) for x in range(e)]

    def feasible(level: int) -> bool:
        g = nx.DiGraph()
        for x in range(e):
            if int(totals[x]):
                g.add_edge("s", ("e", x), capacity=int(totals[x]))
                for r in hosts[x]:
                    g.add_edge(("e", x), ("r", r))
        for r in range(n):
            g.add_edge(("r", r), "t", capacity=level)
        return nx.maximum_flow_value(g, "s", "t") == grand

    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if feasible(mid) else (mid + 1, hi)
    return lo


def certified_optimum(totals: torch.Tensor, placement: torch.Tensor, realised: int, slack: float = 5e-3) -> int:
    """The exact optimum where ``realised`` is more than ``slack`` above the certificate of a
    long rank_quota run, else that certificate (a lower bound: the gap is then overstated)."""
    n = placement.shape[0]
    layout = split_layout(placement, totals.numel())
    bound = int(split_lower_bound(totals, layout, rank_quota(totals, layout, rounds=256).view(n, -1).sum(1).double()))
    return bound if realised <= bound * (1 + slack) else exact_optimum(totals, placement, realised)


def imbalance(loads: torch.Tensor) -> float:
    loads = loads.to(torch.float64)
    mean = float(loads.mean())
    return float(loads.max()) / mean if mean > 0 else 1.0


def _cpu_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first-call allocations and lazy init are not per-step costs
    ms = []
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        ms.append((time.thread_time() - t0) * 1e3)
    return statistics.median(ms)


def _cuda_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    ms = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        ms.append(start.elapsed_time(end))
    return statistics.median(ms)


def _zipf_tokens(experts: int, ranks: int, pairs_per_rank: int, skew: float, seed: int, draw: int) -> torch.Tensor:
    """[N, E] pairs: zipf popularity (hot experts anywhere, not just id 0, fixed by ``seed``)
    times uniform noise in [0.5, 1.5) per rank and expert (drawn by ``draw``)."""
    prob = torch.arange(1, experts + 1, dtype=torch.float64).pow(-skew)
    prob = prob[torch.randperm(experts, generator=torch.Generator().manual_seed(seed))]
    prob /= prob.sum()
    noise = 0.5 + torch.rand(ranks, experts, generator=torch.Generator().manual_seed(draw), dtype=torch.float64)
    return (prob * noise * pairs_per_rank).round().to(torch.int64)


def _timing_case(e: int, n: int, s: int, args, device: torch.device, clock) -> dict:
    previous = _zipf_tokens(e, n, args.pairs_per_rank, args.skew, args.seed, 0).sum(0).to(device)
    tokens = _zipf_tokens(e, n, args.pairs_per_rank, args.skew, args.seed, 1).to(device)
    counts = load_counts(previous, n, s)
    placement = place(previous, counts, n, s)
    layout = split_layout(placement, e)
    rank = torch.tensor([args.rank], device=device)
    index = source_index(layout, rank)
    totals, own = tokens.sum(0), tokens.gather(1, placement)
    mine, earlier = tokens[args.rank : args.rank + 1], (torch.cumsum(tokens, 0) - tokens)[args.rank : args.rank + 1]

    def split(rule: str):
        return source_sends(mine, earlier, rank, plan_split(totals, own, layout, rule), layout, index)

    row = dict(
        counts=clock(lambda: load_counts(previous, n, s), args.repeats),
        place=clock(lambda: place(previous, counts, n, s), args.repeats),
        layout=clock(lambda: (lambda lay: source_index(lay, rank))(split_layout(placement, e)), args.repeats),
        rank=clock(lambda: split("rank"), args.repeats),
        replica=clock(lambda: split("replica"), args.repeats),
    )
    host = placement.cpu()
    for rule in ("rank", "replica"):
        realised = rank_totals(totals.cpu(), host, rule)
        row[f"{rule}_imbalance"] = imbalance(realised)
    realised = int(rank_totals(totals.cpu(), host, "rank").max())
    row["gap"] = realised / certified_optimum(totals.cpu(), host, realised) - 1 if n <= args.exact_up_to else None
    return row


def timing(args) -> None:
    shapes = [tuple(int(v) for v in shape.split(",")) for shape in args.shape] or SHAPES
    devices = [("cpu", torch.device("cpu"), _cpu_ms)]
    if torch.cuda.is_available():
        devices.append(("cuda", torch.device("cuda"), _cuda_ms))
    print(f"timing: zipf={args.skew} pairs/rank={args.pairs_per_rank} torch={torch.__version__} "
          f"threads={torch.get_num_threads()} repeats={args.repeats}, median ms (CPU: process CPU time; "
          f"CUDA: events); metadata per rank, layer and micro-batch (int64)")
    head = (f"{'':<6} {'E':>4} {'N':>5} {'S':>2} | {'counts+place':>12} {'(+layout)':>9} | {'split rank':>10} "
            f"{'split replica':>13} | {'metadata':>8} {'was':>8} | {'max/mean rank':>13} {'replica':>8} {'gap':>7}")
    print(head)
    print("-" * len(head))
    for name, device, clock in devices:
        for e, n, s in shapes:
            check_layout(e, n, s)
            r = _timing_case(e, n, s, args, device, clock)
            gap = "-" if r["gap"] is None else f"{100 * r['gap']:.2f}%"
            print(f"{name:<6} {e:>4} {n:>5} {s:>2} | {r['counts'] + r['place']:12.3f} {r['layout']:9.3f} | "
                  f"{r['rank']:10.3f} {r['replica']:13.3f} | {metadata_bytes(n, e, s) / 1e6:6.3f}MB "
                  f"{8 * 2 * n * e / 1e6:6.1f}MB | {r['rank_imbalance']:13.4f} {r['replica_imbalance']:8.4f} {gap:>7}")
    print("counts+place: per layer and step; (+layout): split_layout + source_index, also once per step; "
          "split: per layer and micro-batch, one rank's plan_split + source_sends; metadata: allreduce_exscan "
          "+ all-gather [N, S] + all-to-all [N, S] (x 2 + E ints more with a capacity factor); was: the [N, 2, E] "
          "all-gather before; gap: rank rule's largest total over the exact optimum (N <= --exact-up-to)")


def families(args) -> None:
    shapes = [(e, n, s) for e in EXPERTS for n in RANKS for s in SLOTS if e <= n * s <= args.max_slots]
    print(f"families: {len(shapes)} shapes (E in {EXPERTS}, N in {RANKS}, S in {SLOTS}, E <= N*S <= "
          f"{args.max_slots}) x {args.seeds} seeds per family")
    head = (f"{'':<14} {'':>5} | {'placement: max/mean expected load, equal split':^64} | "
            f"{'rank split of 1e6 pairs: largest total / exact optimum - 1':^58}\n"
            f"{'family':<14} {'cases':>5} | {'ours':>9} {'EPLB':>9} {'contig':>9} | {'ours/EPLB mean':>14} {'worst':>6} "
            f"{'worse':>5} | {'ours mean':>10} {'worst':>8} {'EPLB mean':>10} {'worst':>8} {'> 0.5%':>7}")
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
                row = [a / mean, b / mean, c / mean, a / b]
                if args.rank_split:
                    pairs = (pop / pop.sum() * 1e6).round().to(torch.int64)
                    for placement in (mine, eplb):
                        realised = int(rank_totals(pairs, placement, "rank").max())
                        row.append(realised / certified_optimum(pairs, placement, realised) - 1)
                rows.append(row)
        everything += rows
        _family_row(family, rows)
    _family_row("all", everything)


def _family_row(name: str, rows: list[list[float]]) -> None:
    col = list(zip(*rows))
    mean = [statistics.fmean(x) for x in col]
    worst = [max(x) for x in col]
    worse = sum(1 for x in col[3] if x > 1 + 1e-12)
    line = (f"{name:<14} {len(rows):>5} | {mean[0]:9.4f} {mean[1]:9.4f} {mean[2]:9.4f} | {mean[3]:14.4f} "
            f"{worst[3]:6.3f} {worse:>5} |")
    if len(col) > 4:
        over = sum(1 for x in col[4] if x > 0.005)
        line += (f" {100 * mean[4]:9.3f}% {100 * worst[4]:7.3f}% {100 * mean[5]:9.3f}% {100 * worst[5]:7.3f}% "
                 f"{over:>7}")
    print(line, flush=True)


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
                        realised[(name, rule)].append(imbalance(rank_totals(torch.tensor(micro), placement, rule)))
            for micro in layer["microbatch_tokens_per_expert"]:
                static.append(imbalance(torch.zeros(n, dtype=torch.int64).index_add_(0, owner, torch.tensor(micro))))
    print(f"trace {path}: {len(its)} iterations, {len(layers)} MoE layers, E={e} N={n} S={s}, "
          f"{len(static)} (layer, micro-batch) splits replayed; max/mean rank totals, mean / worst")
    for name in strategies:
        print(f"  {name:<11} expected (equal split, whole iteration) {statistics.fmean(expected[name]):.4f} / "
              f"{max(expected[name]):.4f} | realised per micro-batch: replica split "
              f"{statistics.fmean(realised[(name, 'replica')]):.4f} / {max(realised[(name, 'replica')]):.4f}, "
              f"rank split {statistics.fmean(realised[(name, 'rank')]):.4f} / {max(realised[(name, 'rank')]):.4f}")
    print(f"  static EP   realised per micro-batch {statistics.fmean(static):.4f} / {max(static):.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", default=[], help="E,N,S of a timing case (repeatable)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--skew", type=float, default=1.0, help="Zipf exponent of the timing cases' popularity")
    ap.add_argument("--pairs-per-rank", type=int, default=32768, help="routed (token, expert) pairs per rank")
    ap.add_argument("--rank", type=int, default=0, help="rank whose split is timed")
    ap.add_argument("--exact-up-to", type=int, default=1024, help="timing: gap to the exact optimum up to N ranks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-timing", dest="timing", action="store_false")
    ap.add_argument("--families", action="store_true", help="balance over the popularity families")
    ap.add_argument("--seeds", type=int, default=3, help="popularity vectors per family and shape")
    ap.add_argument("--max-slots", type=int, default=16384, help="skip shapes with more than N*S slots")
    ap.add_argument("--no-rank-split", dest="rank_split", action="store_false",
                    help="skip the split columns of --families (the slowest part)")
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
