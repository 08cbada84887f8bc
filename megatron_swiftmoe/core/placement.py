"""Expert replica placement and token split plans for SwiftMoE (arXiv 2504.19925).

Slot convention: ``num_ranks`` (N) ranks each hold ``slots_per_rank`` (S) expert
slots. Flat slot ``j`` (0 <= j < N*S) is local slot ``j % S`` of rank ``j // S``;
a placement is an int64 ``[N, S]`` tensor of expert ids, so ``placement.flatten()``
is the flat slot list. Every slot holds a replica of exactly one expert and every
expert has at least one replica.

All functions are pure: no process groups, no hard-coded device (outputs live on the
inputs' device), and deterministic, so every rank that calls them with the same
(all-reduced / all-gathered) inputs gets bit-identical results and no collective is
needed to agree on a placement or plan. Counts, packing and the rank split are small and
sequential: they run on host copies of their inputs (integers and float64 in a fixed
order), which on a GPU costs one copy in and no synchronisation inside.

The split treats the slots of one expert on one rank as one pool (``split_plan``). What
spreads an expert's load is then the number of *ranks* hosting it, so replica counts
(``load_counts``) are host counts, at most N each, until every expert is on every rank;
a second copy on a rank would only cost a slot's memory.
"""

from __future__ import annotations

import bisect
import collections
import functools
import heapq
import itertools
import math
from typing import NamedTuple

import numpy
import torch

__all__ = [
    "repeat",
    "check_layout",
    "replica_capacity",
    "drop_over_capacity",
    "replica_counts",
    "load_counts",
    "place",
    "place_contiguous",
    "rank_loads",
    "split_plan",
    "rank_plan",
    "rank_plan_with_totals",
    "RankPlan",
    "SPLIT_RULES",
    "send_counts",
    "recv_counts",
]


def repeat(values: torch.Tensor, counts: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """``values[i]`` repeated ``counts[i]`` times: ``torch.repeat_interleave`` without its
    multi-threaded CPU kernel, which costs ~0.25 ms a call with 2 threads (vs. ~10 us here).

    values: [K]; counts: int [K], non-negative; total: ``counts.sum()`` if the caller knows
    it (on a GPU, reading it back would synchronise). Returns [counts.sum()].
    """
    ends = torch.cumsum(counts, 0)
    if total is None:
        total = int(ends[-1]) if ends.numel() else 0
    positions = torch.arange(total, device=values.device)
    return values[torch.searchsorted(ends, positions, right=True)]


def check_layout(num_experts: int, num_ranks: int, slots_per_rank: int, topk: int | None = None) -> None:
    """Raise ValueError naming the offending setting if the layout cannot work."""
    if num_experts < 1:
        raise ValueError(f"num_moe_experts must be >= 1, got {num_experts}")
    if slots_per_rank < 1:
        raise ValueError(f"slots_per_rank must be >= 1, got {slots_per_rank}")
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    if num_ranks * slots_per_rank < num_experts:
        need = -(-num_experts // num_ranks)
        raise ValueError(
            f"num_ranks * slots_per_rank ({num_ranks} * {slots_per_rank} = {num_ranks * slots_per_rank}) "
            f"must be >= num_moe_experts ({num_experts}): every expert needs at least one slot; "
            f"raise slots_per_rank to >= {need} or use more ranks"
        )
    if topk is not None:
        if topk < 1:
            raise ValueError(f"moe_router_topk must be >= 1, got {topk}")
        if topk > num_experts:
            raise ValueError(f"moe_router_topk ({topk}) must be <= num_moe_experts ({num_experts})")


def _check_popularity(popularity: torch.Tensor) -> None:
    if popularity.dim() != 1 or popularity.numel() == 0:
        raise ValueError(f"popularity must be a non-empty 1-D tensor [E], got shape {tuple(popularity.shape)}")
    if popularity.is_floating_point() and not bool(torch.isfinite(popularity).all()):
        raise ValueError("popularity contains NaN or inf")
    if bool((popularity < 0).any()):
        raise ValueError("popularity must be non-negative")


def replica_counts(popularity: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Number of replicas per expert, proportional to popularity.

    popularity: [E] non-negative tokens per expert (int or float).
    Returns int64 [E], every entry >= 1, summing to exactly ``num_slots``.

    With goal_e = popularity_e / sum(popularity) * num_slots (num_slots / E if the
    sum is 0), counts start at max(floor(goal), 1). A shortfall is filled one slot
    at a time to the largest goal - count, an excess is removed one slot at a time
    from the largest count - goal among counts > 1; ties go to the lowest expert id.

    Proportionality bound: if every goal_e >= 1 (no expert is lifted to the
    one-replica minimum), then |counts_e - goal_e| < 1 for every e. Otherwise the
    slots taken by lifted experts come out of the others, and the bound weakens to
    1 <= counts_e <= max(ceil(goal_e), 1). In both cases goal_a > goal_b implies
    counts_a >= counts_b.
    """
    _check_popularity(popularity)
    num_experts = popularity.numel()
    if num_slots < num_experts:
        raise ValueError(
            f"num_slots ({num_slots}) must be >= number of experts ({num_experts}): every expert needs "
            f"at least one replica; raise slots_per_rank or the number of ranks"
        )
    pop = popularity.to(torch.float64)
    total = pop.sum()
    if bool(total > 0):
        # Multiply before dividing so integer popularities that split evenly give exact goals.
        goal = pop * num_slots / total
    else:
        goal = torch.full_like(pop, num_slots / num_experts)
    counts = goal.floor().to(torch.int64).clamp(min=1)
    excess = int(counts.sum()) - num_slots
    # Each added slot drops its expert's remainder below every untouched one, so the
    # one-at-a-time greedy equals taking the top remainders at once. The loop only
    # repeats if float rounding left a shortfall of E or more.
    while excess < 0:
        k = min(-excess, num_experts)
        idx = torch.argsort(goal - counts, descending=True, stable=True)[:k]
        counts[idx] += 1
        excess += k
    # Removing one slot from every eligible expert is one full greedy sweep (each
    # removal drops that expert below all untouched ones); sweep while the eligible
    # set is unchanged, then finish with a partial sweep in greedy order.
    while excess > 0:
        eligible = counts > 1
        n = int(eligible.sum())
        if excess >= n:
            sweeps = min(excess // n, int(counts[eligible].min()) - 1)
            counts[eligible] -= sweeps
            excess -= sweeps * n
        else:
            key = torch.where(eligible, counts - goal, torch.full_like(goal, -torch.inf))
            idx = torch.argsort(key, descending=True, stable=True)[:excess]
            counts[idx] -= 1
            excess = 0
    return counts


def _check_layout_args(num_ranks: int, slots_per_rank: int) -> None:
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    if slots_per_rank < 1:
        raise ValueError(f"slots_per_rank must be >= 1, got {slots_per_rank}")


def _check_counts(counts: torch.Tensor, num_ranks: int, slots_per_rank: int) -> None:
    _check_layout_args(num_ranks, slots_per_rank)
    if counts.dim() != 1 or counts.numel() == 0 or counts.is_floating_point():
        raise ValueError(f"counts must be a non-empty 1-D integer tensor [E], got {counts.dtype} {tuple(counts.shape)}")
    if bool((counts < 1).any()):
        raise ValueError("counts must be >= 1 for every expert")
    total = int(counts.sum())
    if total != num_ranks * slots_per_rank:
        raise ValueError(
            f"counts must sum to num_ranks * slots_per_rank ({num_ranks} * {slots_per_rank} = "
            f"{num_ranks * slots_per_rank}), got {total}"
        )


def place_contiguous(counts: torch.Tensor, num_ranks: int, slots_per_rank: int) -> torch.Tensor:
    """The paper's layout: replicas laid out expert by expert over the flat slot list.

    counts: [E] int, sum N*S. Returns int64 [N, S] expert ids.
    """
    _check_counts(counts, num_ranks, slots_per_rank)
    experts = torch.arange(counts.numel(), device=counts.device)
    flat = repeat(experts, counts.to(torch.int64))
    return flat.view(num_ranks, slots_per_rank)


def load_counts(popularity: torch.Tensor, num_ranks: int, slots_per_rank: int) -> torch.Tensor:
    """Replica counts that minimise the largest load per host, popularity_e / counts_e.

    popularity: [E] non-negative tokens per expert (int or float; all zero counts as uniform).
    Returns int64 [E] on popularity's device, every entry >= 1, summing to exactly N*S.

    Why at most N: the rank split (``split_plan``) treats the slots of one expert on one rank
    as one pool, so what spreads an expert's load is the number of *ranks* hosting it; a second
    copy on a rank only costs memory. Under the equal-replica split a rank holding k of e's c
    copies takes k/c of e, and the fullest host holds ceil(c/N) of them, so its share
    ceil(c/N) * p_e / c is never below p_e / N either: counts above N never lower the maximum.
    Hence, when N*S <= E*N (S <= E), counts are host counts in [1, N]: starting from one each,
    every further slot goes to the expert with the largest popularity_e / counts_e among those
    below N (ties: lowest id). This greedy is exact for the separable min-max problem, so

        lambda* = max_e popularity_e / counts_e
                = min { max_e p_e / c_e : 1 <= c_e <= N, sum_e c_e = N*S },

    and with P = sum(popularity), F = N*S:  max(P / F, max_e p_e / N) <= lambda* <=
    max(P / (F - E), max_e p_e / N) for F > E (the upper bound: c_e = min(N, 1 +
    floor(p_e (F - E) / P)) fits in F slots). lambda* is also a lower bound on the largest
    rank load of *any* placement on N ranks x S slots under either split, since the busiest
    host of e takes at least p_e / min(c_e, N). Counts are monotone: p_a > p_b (or p_a = p_b
    and a < b) implies c_a >= c_b. When S > E every expert is on every rank and the S - E
    spare slots of each rank hold whole extra rounds of N copies, hottest experts first, so
    every rank holds the same number of copies of each expert.
    """
    _check_popularity(popularity)
    _check_layout_args(num_ranks, slots_per_rank)
    n, e = num_ranks, popularity.numel()
    f = n * slots_per_rank
    if f < e:
        raise ValueError(
            f"num_ranks * slots_per_rank ({num_ranks} * {slots_per_rank} = {f}) must be >= number of "
            f"experts ({e}): every expert needs at least one replica; raise slots_per_rank or the number of ranks"
        )
    pop = popularity.detach().to("cpu", torch.float64)
    if not bool(pop.sum() > 0):
        pop = torch.ones_like(pop)
    if f >= e * n:
        spare = slots_per_rank - e
        position = torch.empty(e, dtype=torch.int64)
        position[torch.argsort(pop, descending=True, stable=True)] = torch.arange(e)
        rounds = 1 + spare // e + (position < spare % e).to(torch.int64)
        return (rounds * n).to(popularity.device)
    # extra[e] = replicas beyond the first; extra slot k of e (k = 1..N-1) has priority p_e / k.
    budget, positive = f - e, pop > 0
    if budget == 0:
        return torch.ones(e, dtype=torch.int64, device=popularity.device)
    if budget >= int(positive.sum()) * (n - 1):
        # Every popular expert on every rank; the rest go to idle experts, lowest id first
        # (their priorities are all 0), as the greedy would.
        extra = torch.where(positive, n - 1, 0).to(torch.int64)
        idle = torch.nonzero(~positive).flatten()
        left = budget - int(positive.sum()) * (n - 1)
        extra[idle] = (left - torch.arange(idle.numel()) * (n - 1)).clamp(0, n - 1)
        return (1 + extra).to(popularity.device)
    # Threshold lam solving sum_e min(N-1, p_e / lam) = budget: with the j most popular experts
    # capped, lam_j = (popularity of the others) / (budget - (N-1) j); the right j is the first
    # whose next expert stays below the cap. Its precision only affects how much is left to
    # the heap below, not the result.
    q = torch.sort(pop, descending=True).values
    j = torch.arange(e, dtype=torch.float64)
    denominator = budget - (n - 1) * j
    lam_j = (q.sum() - torch.cumsum(q, 0) + q) / denominator.clamp(min=1)
    fits = (denominator > 0) & (q < (n - 1) * lam_j)
    lam = float(lam_j[int(torch.argmax(fits.to(torch.int8)))]) if bool(fits.any()) else float(pop.sum()) / budget
    # ... then take exactly the items with priority >= lam (float-exact: m_e counts k with
    # p_e / k >= lam), which is a prefix of the greedy order, and finish the greedy on a heap.
    extra = torch.floor(pop / lam).clamp(0, n - 1).to(torch.int64)
    for _ in range(2):
        extra -= ((extra >= 1) & (pop / extra.clamp(min=1) < lam)).to(torch.int64)
        extra += ((extra < n - 1) & (pop / (extra + 1) >= lam)).to(torch.int64)
    counts = (1 + extra).tolist()
    p = pop.tolist()
    short = budget - int(extra.sum())
    if short > 0:  # next priorities, largest first, ties by lowest id
        heap = [(-p[i] / counts[i], i) for i in range(e) if counts[i] < n and p[i] > 0]
        heapq.heapify(heap)
        for _ in range(short):
            _, i = heapq.heappop(heap)
            counts[i] += 1
            if counts[i] < n:
                heapq.heappush(heap, (-p[i] / counts[i], i))
    elif short < 0:  # float rounding took one too many: drop the smallest taken, highest id first
        heap = [(p[i] / (counts[i] - 1), -i) for i in range(e) if counts[i] > 1]
        heapq.heapify(heap)
        for _ in range(-short):
            _, i = heapq.heappop(heap)
            counts[-i] -= 1
            if counts[-i] > 1:
                heapq.heappush(heap, (p[-i] / (counts[-i] - 1), i))
    return torch.tensor(counts, dtype=torch.int64, device=popularity.device)


def place(
    popularity: torch.Tensor, counts: torch.Tensor, num_ranks: int, slots_per_rank: int, max_swaps: int | None = None
) -> torch.Tensor:
    """Balanced placement of ``counts[e]`` replicas of each expert onto N ranks x S slots.

    popularity: [E] tokens per expert; counts: [E] int >= 1 summing to N*S.
    Returns int64 [N, S] expert ids on counts' device, each rank's slots sorted by expert id.

    A replica of e carries w_e = popularity_e / counts_e. Longest processing time first:
    replicas, heaviest first (ties: lowest expert id), each go to the lightest rank with a free
    slot that does not hold the expert yet (ties: lowest rank), or, only if every rank with a
    free slot holds it, to the lightest of those holding the fewest copies. Because an expert's
    replicas are consecutive in that order, its copies go to the counts_e lightest ranks with a
    free slot at once; when counts_e <= N and enough ranks have room, no rank gets two.

    Then a bounded local search: while the most loaded rank M can swap a replica a with a
    lighter replica b of one of the ``_SWAP_PARTNERS`` least loaded ranks r so that both end
    below load(M) (without putting more than ceil(counts / N) copies of an expert on a rank),
    it does so with the least loaded such r, choosing the swap that leaves max(load M, load r)
    smallest (ties: first slots). Each swap lowers the sorted load vector, so it terminates;
    it stops after ``max_swaps`` (default N) swaps. Both bounds keep the planning time in
    check. A duplicate that LPT was forced into (counts_e <= N) is first swapped away where
    some rank can take the copy. Loads are float64 sums in a fixed order: every rank computes
    the same placement.
    """
    _check_counts(counts, num_ranks, slots_per_rank)
    if popularity.shape != counts.shape:
        raise ValueError(f"popularity shape {tuple(popularity.shape)} must match counts shape {tuple(counts.shape)}")
    _check_popularity(popularity)
    n, s = num_ranks, slots_per_rank
    c = counts.tolist()
    pop = popularity.detach().to("cpu", torch.float64)
    if not bool(pop.sum() > 0):
        pop = torch.ones_like(pop)  # as load_counts: all zero counts as uniform
    w = [p / k for p, k in zip(pop.tolist(), c)]
    slots: list[list[int]] = [[] for _ in range(n)]
    load = [0.0] * n
    heap = [(0.0, r) for r in range(n)]  # ranks with a free slot, lightest first
    for expert in sorted(range(len(c)), key=lambda i: (-w[i], i)):
        left = c[expert]
        while left:  # one round: one more copy on each of the lightest ranks with room
            batch = [heapq.heappop(heap) for _ in range(min(left, len(heap)))]
            for _, r in batch:
                slots[r].append(expert)
                load[r] += w[expert]
            for _, r in batch:
                if len(slots[r]) < s:
                    heapq.heappush(heap, (load[r], r))
            left -= len(batch)
    _local_search(slots, load, w, c, n if max_swaps is None else max_swaps)
    return torch.tensor([sorted(row) for row in slots], dtype=torch.int64, device=counts.device)


_SWAP_PARTNERS = 8  # least loaded ranks a swap may use: bounds the cost of a failed search


def _local_search(slots: list[list[int]], load: list[float], w: list[float], c: list[int], max_swaps: int) -> None:
    """The swaps of ``place``, in place. slots: N lists of expert ids; load: [N]; w, c: [E]."""
    n = len(slots)
    cap = [-(-k // n) for k in c]  # copies of an expert one rank may hold: ceil(counts / N)
    held = [collections.Counter(row) for row in slots]
    ranked = sorted((l, r) for r, l in enumerate(load))

    def swap(m: int, i: int, r: int, j: int) -> None:
        a, b = slots[m][i], slots[r][j]
        for rank, gain in ((m, w[b] - w[a]), (r, w[a] - w[b])):
            del ranked[bisect.bisect_left(ranked, (load[rank], rank))]
            load[rank] += gain
            bisect.insort(ranked, (load[rank], rank))
        slots[m][i], slots[r][j] = b, a
        held[m][a] -= 1
        held[m][b] += 1
        held[r][b] -= 1
        held[r][a] += 1

    def best_swap(m: int, slot_ids, partners, bound: float) -> tuple | None:
        # With the first partner r (lightest first) that can take one of m's replicas `slot_ids`
        # for another leaving max(load m, load r) below `bound`: the swap that leaves it
        # smallest, as (max, i, r, j). Only for a lighter replica, unless repairing (bound inf).
        for r in partners:
            if (load[m] + load[r]) / 2 >= bound:  # nor with any heavier partner
                break
            if r == m:
                continue
            best = None
            for i in slot_ids:
                a = slots[m][i]
                if held[r][a] >= cap[a]:
                    continue
                for j, b in enumerate(slots[r]):
                    d = w[a] - w[b]
                    if b == a or held[m][b] >= cap[b] or (d <= 0 and bound < math.inf):
                        continue
                    worse = max(load[m] - d, load[r] + d)
                    if worse < (bound if best is None else best[0]):
                        best = (worse, i, r, j)
            if best:
                return best
        return None

    for m in range(n):  # duplicates LPT was forced into: move a copy to a rank that can take it
        for i, a in enumerate(slots[m]):
            if held[m][a] > cap[a] and (found := best_swap(m, [i], range(n), math.inf)):
                swap(m, *found[1:])
    for _ in range(max_swaps):
        top, m = ranked[-1]
        found = best_swap(m, range(len(slots[m])), [r for _, r in ranked[:_SWAP_PARTNERS]], top)
        if found is None:
            return
        swap(m, *found[1:])


def rank_loads(popularity: torch.Tensor, placement: torch.Tensor) -> torch.Tensor:
    """Expected tokens per rank: sum over its slots of popularity_e / (replicas of e).

    popularity: [E]; placement: [N, S] expert ids. Returns float64 [N].
    """
    counts = torch.bincount(placement.flatten(), minlength=popularity.numel()).clamp(min=1)
    weight = popularity.to(device=placement.device, dtype=torch.float64) / counts
    return weight[placement].sum(1)


SPLIT_RULES = ("rank", "replica")


class _SplitState(NamedTuple):
    slot_expert: torch.Tensor  # [F] expert of each flat slot
    local: torch.Tensor  # [F] tokens slot j takes from its own rank
    demand_lo: torch.Tensor  # [F] residual demand interval of slot j on its expert's number line
    demand_hi: torch.Tensor  # [F]
    supply: torch.Tensor  # [N, E] residual tokens rank i still has to send for expert e
    totals: torch.Tensor  # [N] pairs each rank computes


def _replica_quota(total: torch.Tensor, slot_expert: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The paper's split: every slot of e gets T_e // c_e, the first T_e % c_e one more. [F]."""
    order = torch.argsort(slot_expert, stable=True)
    occ = torch.empty_like(order)
    occ[order] = torch.arange(order.numel()) - (counts.cumsum(0) - counts)[slot_expert[order]]
    t = total[slot_expert]
    c = counts.clamp(min=1)[slot_expert]
    return t // c + (occ < t % c).to(torch.int64)


class _Classes(NamedTuple):
    """What the rank split needs of a placement: pools (distinct (rank, expert)), rank classes
    (ranks hosting the same experts), their cells (class, expert), and the orders that spread
    a class's flows over its ranks."""

    first: torch.Tensor  # [P] first flat slot of each pool, pools sorted by (rank, expert)
    pool: torch.Tensor  # [P] rank * E + expert of each pool: its entry of the flat [N, E] tokens
    pool_rank: torch.Tensor  # [P]
    pool_cell: torch.Tensor  # [P] cell of each pool; cells sorted: class by class, experts ascending
    size: list[int]  # [K] ranks per class
    experts: list[list[int]]  # [K] experts of each class (its cells, in order)
    inc: list[list[tuple[int, int]]]  # [E] (class, position in its experts) hosting each expert
    by_cell: torch.Tensor  # [P] pools by (cell, rank)
    cell_start: torch.Tensor  # [P] position in by_cell of the first pool of the same cell
    sorted_cell: torch.Tensor  # [P] pool_cell[by_cell]
    by_class: torch.Tensor  # [N] ranks by (class, rank)
    class_start: torch.Tensor  # [N] position in by_class of the first rank of the same class
    sorted_class: torch.Tensor  # [N] class of each rank in by_class order
    class_cells: torch.Tensor  # [K + 1] first cell of each class, then the number of cells C
    class_bounds: list[int]  # class_cells as a list
    cell_class: torch.Tensor  # [C] class of each cell
    cell_expert: torch.Tensor  # [C] expert of each cell
    component: torch.Tensor  # [E] connected component of each expert (experts linked by a rank hosting both)
    component_ranks: torch.Tensor  # [E] ranks of each component (0: not a component's label)
    order: list[int]  # [E] experts by fewest hosting classes, then id: the greedy fill's order


def _classes(placement: torch.Tensor, e: int, alone: torch.Tensor | None = None) -> _Classes:
    """placement: [N, S] (host); alone: bool [N], ranks that must form a class of their own."""
    n, s = placement.shape
    pool, where = torch.unique(torch.arange(n * s) // s * e + placement.flatten(), return_inverse=True)
    first = torch.full((pool.numel(),), n * s, dtype=torch.int64).scatter_reduce(0, where, torch.arange(n * s), "amin")
    pool_rank, pool_expert = pool // e, pool % e
    # Class key of a rank: its distinct experts (sorted, padded with e), and its id if alone.
    rows = torch.full((n, s + 1), -1, dtype=torch.int64)
    rows[:, :s] = e
    rows[pool_rank, torch.arange(pool.numel()) - torch.searchsorted(pool_rank, pool_rank)] = pool_expert
    if alone is not None:
        rows[:, s] = torch.where(alone, torch.arange(n), -1)
    # One int64 key per rank (torch.unique over rows is ~10x slower): the row in base n + e + 2,
    # modulo a prime so that nothing overflows, and checked below.
    key = torch.zeros(n, dtype=torch.int64)
    for column in rows.T:
        key = (key * (n + e + 2) + column + 1) % 2147483647  # a prime, 2**31 - 1
    _, class_of = torch.unique(key, return_inverse=True)
    representative = torch.full((n,), n, dtype=torch.int64).scatter_reduce(0, class_of, torch.arange(n), "amin")
    if not torch.equal(rows, rows[representative[class_of]]):  # a collision: exact but slower
        _, class_of = torch.unique(rows, dim=0, return_inverse=True)
    size = torch.bincount(class_of)
    cell = class_of[pool_rank] * e + pool_expert
    cells, pool_cell = torch.unique(cell, return_inverse=True)
    experts: list[list[int]] = [[] for _ in range(size.numel())]
    inc: list[list[tuple[int, int]]] = [[] for _ in range(e)]
    for c_e in cells.tolist():
        c, x = divmod(c_e, e)
        inc[x].append((c, len(experts[c])))
        experts[c].append(x)
    by_cell = torch.argsort(pool_cell, stable=True)  # pools are in rank order already
    by_class = torch.argsort(class_of, stable=True)
    sizes = size.tolist()
    bounds = torch.searchsorted(cells, torch.arange(size.numel() + 1) * e)
    return _Classes(
        first, pool, pool_rank, pool_cell, sizes, experts, inc, by_cell,
        torch.searchsorted(pool_cell[by_cell], pool_cell[by_cell]), pool_cell[by_cell], by_class,
        torch.searchsorted(class_of[by_class], class_of[by_class]), class_of[by_class],
        bounds, bounds.tolist(), cells // e, cells % e, *_components(experts, sizes, e),
        sorted(range(e), key=lambda x: (len(inc[x]), x)),
    )


def _components(experts: list[list[int]], size: list[int], e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Connected components of the expert-class graph (union-find). A component's pairs can
    only go to its own ranks, so ceil(pairs / ranks) of every component bounds the split's
    largest rank load from below. Returns ([E] component label of each expert, [E] ranks per
    label)."""
    parent = list(range(e))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for ex in experts:
        a = root(ex[0])
        for x in ex[1:]:
            b = root(x)
            if b != a:
                parent[b] = a
    ranks = [0] * e
    for ex, m in zip(experts, size):
        ranks[root(ex[0])] += m
    return torch.tensor([root(x) for x in range(e)]), torch.tensor(ranks)


@functools.lru_cache(maxsize=64)
def _classes_of(n: int, s: int, e: int, placement: bytes, alone: bytes | None = None) -> _Classes:
    # Fixed for a step while the split runs per layer and micro-batch: worth remembering.
    return _classes(
        torch.frombuffer(bytearray(placement), dtype=torch.int64).view(n, s), e,
        None if alone is None else torch.frombuffer(bytearray(alone), dtype=torch.bool),
    )


def _rank_quota(tokens: torch.Tensor, placement: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """The rank split: per flat slot, the pairs it computes. tokens: [N, E]; placement: [N, S];
    total: [E], tokens summed over ranks.

    The slots of expert e on rank r are one pool: its first slot computes all of the pool's
    pairs x[e, r], the others none. x minimises the largest rank total max_r sum_e x[e, r],
    and among such splits keeps the most pairs on their source rank (local: the fewest sent).
    Ranks hosting the same experts are solved as one class of m ranks taking up to m * L
    (``_pool_flows``, exact), then spread over its ranks, which needs every rank's own pairs to
    fit under L: ranks whose own pairs of their experts exceed ceil(T / N) <= L form classes
    of one. Host tensors in, host tensor out.
    """
    n, s = placement.shape
    e = tokens.shape[1]
    grand = int(total.sum())
    quota = torch.zeros(n * s, dtype=torch.int64)
    if grand == 0:
        return quota
    key = placement.contiguous().numpy().tobytes()
    st = _classes_of(n, s, e, key)
    own = tokens.reshape(-1)[st.pool]  # [P] pairs of the pool's expert from its own rank
    lower = -(-grand // n)
    rank_own = torch.zeros(n, dtype=torch.int64).index_add_(0, st.pool_rank, own)
    alone = rank_own > lower
    if bool(alone.any()):
        st = _classes_of(n, s, e, key, alone.numpy().tobytes())
    # The largest component bound: a tighter start than ceil(T / N), and in most cases
    # measured the answer, so L rarely has to rise below.
    pairs = torch.zeros(e, dtype=torch.int64).index_add_(0, st.component, total)
    hosted = st.component_ranks > 0
    bound = max(lower, int((-(-pairs[hosted] // st.component_ranks[hosted])).max()))
    local = torch.zeros(st.class_bounds[-1], dtype=torch.int64).index_add_(0, st.pool_cell, own)  # [C]
    sums = (
        torch.zeros(len(st.size), dtype=torch.int64).index_add_(0, st.cell_class, local).tolist(),
        torch.zeros(e, dtype=torch.int64).index_add_(0, st.cell_expert, local).tolist(),
    )
    local = local.tolist()
    local_lists = [local[a:b] for a, b in itertools.pairwise(st.class_bounds)]
    level, lf, rf, pinned = _pool_flows(total.tolist(), st.experts, st.size, local_lists, bound, st.inc, st.order, sums)

    # Back to ranks: a class's local pairs of e go to its ranks in rank order (each at most
    # its own pairs, so a rank's local load stays <= L), then its remote pairs, expert by
    # expert, fill its ranks in rank order up to L: on the class's number line of remote
    # pairs, rank r takes [lo_r, hi_r) and expert e's pool on r the overlap with e's interval.
    cells = st.class_bounds[-1]
    remote_flow = torch.from_numpy(numpy.fromiter(itertools.chain.from_iterable(rf), numpy.int64, cells))  # [C]
    if pinned:  # every rank keeps all its own pairs of its experts
        kept = own
    else:
        local_flow = torch.from_numpy(numpy.fromiter(itertools.chain.from_iterable(lf), numpy.int64, cells))
        own_sorted = own[st.by_cell]
        before = own_sorted.cumsum(0) - own_sorted
        before -= before[st.cell_start]
        kept = torch.empty_like(own)
        kept[st.by_cell] = (local_flow[st.sorted_cell] - before).clamp(min=0).minimum(own_sorted)
        rank_own = torch.zeros(n, dtype=torch.int64).index_add_(0, st.pool_rank, kept)
    room = (level - rank_own)[st.by_class]
    room_before = room.cumsum(0) - room
    room_before -= room_before[st.class_start]
    remote_hi = remote_flow.cumsum(0)  # one number line for all classes, class by class
    offset = torch.cat([remote_hi.new_zeros(1), remote_hi])[st.class_cells]  # [K + 1] class starts
    end = offset[1:][st.sorted_class]
    start = offset[:-1][st.sorted_class]
    lo = torch.empty(n, dtype=torch.int64)
    lo[st.by_class] = (start + room_before).minimum(end)
    hi = torch.empty(n, dtype=torch.int64)
    hi[st.by_class] = (start + room_before + room).minimum(end)
    cell = st.pool_cell
    remote = _overlap(lo[st.pool_rank], hi[st.pool_rank], remote_hi[cell] - remote_flow[cell], remote_hi[cell])
    quota[st.first] = kept + remote
    return quota


def _pool_flows(
    total: list[int],
    classes: list[list[int]],
    size: list[int],
    local: list[list[int]],
    lower: int,
    inc: list[list[tuple[int, int]]],
    order: list[int],
    local_sums: tuple[list[int], list[int]],
) -> tuple[int, list[list[int]], list[list[int]], bool]:
    """Exact integer split of each expert's pairs over the rank classes hosting it.

    total: [E] pairs per expert; classes: K lists of distinct expert ids, a class being the
    ranks that host exactly these experts; size: [K] ranks per class; local: K lists aligned
    with ``classes``, the pairs of that expert whose source rank is in the class; lower: a
    lower bound on the answer; inc: [E] (class, position) pairs hosting each expert; order:
    the experts in the order the greedy fill takes them (fewest hosts first); local_sums:
    ``local`` summed per class [K] and per expert [E]. Returns (L, local_flow, remote_flow,
    pinned): L is the smallest largest rank load of any split (a class takes at most size *
    L), per class and expert the pairs it computes from its own sources and from other ranks,
    with the most local pairs among the splits that reach L, and whether that is all of
    ``local``.

    A flow from the experts to the classes with capacities size * L, for a rising L. Every
    local pair placed first, the rest straight to classes with room, then augmenting paths
    that move remote pairs only: while that places everything it is also the most local split.
    If no class with room is reachable from the unplaced pairs, the experts K and classes R
    reachable form a closed set (K's pairs can only land in R), so L* >= ceil(T(K) / |R|) > L:
    L rises to that and the flow is kept. If a class with room is reachable only by moving
    local pairs, locality and balance conflict: L* is then found without locality (the same
    flow, continued with every pair movable) and the most local split at L* by a min-cost flow
    (``_cheapest``).
    """
    level = lower
    flows = _flows_at(level, total, classes, size, local, local_sums)
    while not _place(inc, classes, flows, order):
        if not flows.pinned or _reach(inc, classes, flows)[2]:
            break
        level = _raise(inc, classes, flows, level, total, size)
    else:
        return level, flows.lf, flows.rf, flows.pinned
    # Local pairs count as remote in the copy, so every pair may move. The local flow keeps
    # the most local pairs its capacities allow, so it is the cheapest flow of its size: where
    # L* is its level, the min-cost phases start from it.
    plain = _Flows(flows.cap, [[0] * len(row) for row in flows.lf], list(flows.load), list(flows.left))
    plain.rf = [[a + b for a, b in zip(lf, rf)] for lf, rf in zip(flows.lf, flows.rf)]
    start = level
    while not _place(inc, classes, plain, order):
        level = _raise(inc, classes, plain, level, total, size)
    if level != start:
        flows = _flows_at(level, total, classes, size, local, local_sums)
        if _place(inc, classes, flows, order):
            return level, flows.lf, flows.rf, flows.pinned
    if _cheapest(inc, classes, flows, local):
        return level, flows.lf, flows.rf, False
    raise AssertionError("no split at the smallest feasible load")  # unreachable: L* is feasible


class _Flows:
    """Flow state of ``_pool_flows``: per class and expert position, local and remote pairs."""

    def __init__(self, cap, lf, load, left):
        self.cap = cap  # [K] pairs each class may compute
        self.lf = lf  # [K][.] pairs of each cell computed on their source ranks
        self.rf = [[0] * len(row) for row in lf]  # [K][.] pairs of each cell from other ranks
        self.load = load  # [K]
        self.left = left  # [E] pairs not placed yet
        self.pinned = True  # every local pair placed locally


def _flows_at(level, total, classes, size, local, local_sums) -> _Flows:
    """Local pairs placed first: all of a class's where they fit (the common case), else its
    first ones in expert order up to its capacity."""
    class_local, expert_local = local_sums
    cap = [m * level for m in size]
    flows = _Flows(cap, [row[:] for row in local], list(class_local), [t - v for t, v in zip(total, expert_local)])
    for c, (placed, room) in enumerate(zip(class_local, cap)):
        if placed > room:
            lf = flows.lf[c]
            for k, x in enumerate(classes[c]):
                take = min(lf[k], room)
                flows.left[x] += lf[k] - take
                lf[k] = take
                room -= take
            flows.load[c] = cap[c]
            flows.pinned = False
    return flows


def _place(inc, classes, flows, order) -> bool:
    """Fill, then augment through remote pairs; True when every pair is placed."""
    cap, load, left, rf = flows.cap, flows.load, flows.left, flows.rf
    # Straight to hosting classes with room, experts with fewest classes first: a fixed order
    # (no sorting per call), the augmenting paths repair what it gets wrong.
    for x in order:
        want = left[x]
        if not want:
            continue
        for c, k in inc[x]:
            room = cap[c] - load[c]
            if room <= 0:
                continue
            d = room if room < want else want
            rf[c][k] += d
            load[c] += d
            want -= d
            if not want:
                break
        left[x] = want
    if any(left):
        _augment(inc, classes, flows)
    return not any(left)


def _raise(inc, classes, flows, level, total, size) -> int:
    """The bound of the closed set reachable from the unplaced pairs; capacities follow."""
    experts, reached, _ = _reach(inc, classes, flows)
    level = max(level + 1, -(-sum(total[x] for x in experts) // sum(size[c] for c in reached)))
    flows.cap = [m * level for m in size]
    return level


def _reach(inc, classes, flows) -> tuple[list[int], list[int], bool]:
    """Experts and classes reachable from unplaced pairs by moving any placed pair, and whether
    a reachable class has room."""
    left, lf, rf = flows.left, flows.lf, flows.rf
    seen_x = [bool(v) for v in left]
    seen_c = [False] * len(flows.cap)
    queue = collections.deque(x for x in range(len(left)) if left[x])
    room = False
    while queue:
        x = queue.popleft()
        for c, _ in inc[x]:
            if seen_c[c]:
                continue
            seen_c[c] = True
            room |= flows.cap[c] > flows.load[c]
            for k2, x2 in enumerate(classes[c]):
                if (lf[c][k2] or rf[c][k2]) and not seen_x[x2]:
                    seen_x[x2] = True
                    queue.append(x2)
    return [x for x in range(len(left)) if seen_x[x]], [c for c in range(len(seen_c)) if seen_c[c]], room


def _augment(inc, classes, flows, local=None, dist=None) -> bool:
    """Blocking flows (Dinic) from the unplaced pairs to classes with room; True if any moved.

    Without ``dist`` only remote pairs move: an arc expert -> class adds a remote pair
    (unbounded), class -> expert moves one of the class's remote pairs of that expert to
    another of its hosts (up to rf); local pairs stay where they are. With ``dist = (d_expert,
    d_class, target)`` from ``_cheapest``: only arcs of reduced cost 0 (a new local pair costs
    0, a new remote one 1, moving a local pair 0, moving a remote one -1), from unplaced pairs
    at distance 0 to classes with room at distance ``target``.

    Each phase's levels stop at the first level with room and paths end there (the shortest
    augmenting paths, as Dinic needs); a backward pass then keeps only the nodes that lead to
    room, so the walks meet a dead end only where an arc saturated on the way.
    """
    cap, load, left, lf, rf = flows.cap, flows.load, flows.left, flows.lf, flows.rf
    remote = dist is None  # then the checks below are inline: the common case, and the hot loop
    d_x, d_c, cheapest = (None, None, None) if remote else dist

    def forward(x, c, k):  # kind of the arc x -> c: 0 a local pair, 1 a remote one, None unusable
        kind = 0 if lf[c][k] < local[c][k] else 1
        return kind if d_c[c] == d_x[x] + kind else None

    def backward(c, k, x):  # kind of the pair of x that c can move away, None if none
        if rf[c][k] and d_x[x] == d_c[c] - 1:
            return 1
        return 0 if lf[c][k] and d_x[x] == d_c[c] else None

    moved = False
    while True:
        roots = [x for x, v in enumerate(left) if v and (remote or d_x[x] == 0)]
        level_x, level_c = [-1] * len(left), [-1] * len(cap)
        for x in roots:
            level_x[x] = 0
        x_levels, c_levels = [roots], []
        frontier, found = roots, False
        while frontier:
            depth = 2 * len(c_levels) + 1
            reached = []
            for x in frontier:
                for c, k in inc[x]:
                    if level_c[c] < 0 and (remote or forward(x, c, k) is not None):
                        level_c[c] = depth
                        reached.append(c)
                        if load[c] < cap[c] and (remote or d_c[c] == cheapest):
                            found = True
            c_levels.append(reached)
            if found:
                break
            frontier = []
            for c in reached:
                for k2, (x2, v) in enumerate(zip(classes[c], rf[c])):
                    if level_x[x2] < 0 and (v if remote else backward(c, k2, x2) is not None):
                        level_x[x2] = depth + 1
                        frontier.append(x2)
            x_levels.append(frontier)
        if not found:
            return moved
        target = 2 * len(c_levels) - 1
        # Keep only what leads to a class with room.
        useful_c, useful_x = [False] * len(cap), [False] * len(left)
        for c in c_levels[-1]:
            useful_c[c] = load[c] < cap[c] and (remote or d_c[c] == cheapest)
        for i in range(len(c_levels) - 1, -1, -1):
            depth = 2 * i + 1
            for x in x_levels[i]:
                for c, k in inc[x]:
                    if useful_c[c] and level_c[c] == depth and (remote or forward(x, c, k) is not None):
                        useful_x[x] = True
                        break
            if i:
                for c in c_levels[i - 1]:
                    for k2, (x2, v) in enumerate(zip(classes[c], rf[c])):
                        if useful_x[x2] and level_x[x2] == depth - 1:
                            if v if remote else backward(c, k2, x2) is not None:
                                useful_c[c] = True
                                break
        next_x, next_c = [0] * len(left), [0] * len(cap)  # the first arc not yet known useless
        for root in roots:
            path, arcs = [root], []  # expert, class, expert, ...; arcs: (class, position, kind)
            while left[root] and useful_x[root]:
                u = path[-1]
                step = None
                if len(path) % 2:  # at an expert: on to a useful class one level deeper
                    i, depth = next_x[u], level_x[u] + 1
                    for c, k in itertools.islice(inc[u], i, None):
                        if useful_c[c] and level_c[c] == depth:
                            kind = 1 if remote else forward(u, c, k)
                            if kind is not None:
                                step = (c, k, kind)
                                break
                        i += 1
                    next_x[u] = i
                    if step is None:
                        useful_x[u] = False
                else:  # at a class: move one of its pairs of a useful deeper expert away
                    row, i, depth = rf[u], next_c[u], level_c[u] + 1
                    for x in itertools.islice(classes[u], i, None):
                        if useful_x[x] and level_x[x] == depth:
                            kind = (1 if row[i] else None) if remote else backward(u, i, x)
                            if kind is not None:
                                step = (u, i, kind)
                                break
                        i += 1
                    next_c[u] = i
                    if step is None:
                        useful_c[u] = False
                if step is None:  # dead end: back off (the parent skips it now)
                    if len(path) > 1:
                        path.pop()
                        arcs.pop()
                    continue
                path.append(step[0] if len(path) % 2 else classes[u][step[1]])
                arcs.append(step)
                if len(path) % 2 == 0 and level_c[path[-1]] == target:  # a class with room
                    end = path[-1]
                    d = min(left[root], cap[end] - load[end])
                    for j, (c, k, kind) in enumerate(arcs):
                        if j % 2:
                            d = min(d, (rf if kind else lf)[c][k])
                        elif not kind:
                            d = min(d, local[c][k] - lf[c][k])
                    for j, (c, k, kind) in enumerate(arcs):
                        (rf if kind else lf)[c][k] += -d if j % 2 else d
                    left[root] -= d
                    load[end] += d
                    moved = True
                    if load[end] >= cap[end]:
                        useful_c[end] = False
                    path, arcs = [root], []  # expert, class, expert, ...; arcs: (class, position, kind)


def _cheapest(inc, classes, flows, local) -> bool:
    """Primal-dual min-cost phases (cost = remote pairs); True once every pair is placed.

    The flow is min-cost for its size on entry (no negative cycle). Bellman-Ford (SPFA)
    distances from the unplaced pairs, then blocking flows along cheapest paths only.
    """
    left, lf, rf = flows.left, flows.lf, flows.rf
    while any(left):
        d_x = [0 if v else math.inf for v in left]
        d_c = [math.inf] * len(flows.cap)
        queue = collections.deque((0, x) for x in range(len(left)) if left[x])
        while queue:
            side, v = queue.popleft()
            if side == 0:
                for c, k in inc[v]:
                    d = d_x[v] + (lf[c][k] >= local[c][k])
                    if d < d_c[c]:
                        d_c[c] = d
                        queue.append((1, c))
            else:
                for k2, x2 in enumerate(classes[v]):
                    step = -1 if rf[v][k2] > 0 else (0 if lf[v][k2] > 0 else None)
                    if step is not None and d_c[v] + step < d_x[x2]:
                        d_x[x2] = d_c[v] + step
                        queue.append((0, x2))
        target = min((d_c[c] for c in range(len(d_c)) if flows.cap[c] > flows.load[c]), default=math.inf)
        if target == math.inf or not _augment(inc, classes, flows, local, (d_x, d_c, target)):
            return False
    return True


def _split_state(tokens: torch.Tensor, placement: torch.Tensor, rule: str) -> _SplitState:
    """Per-slot quotas (``rule``), local fill, residual demand prefix sums and residual supply
    shared by the plan views. Computed on host copies of the inputs (tiny, and the rank
    rule is sequential): on a GPU that is one copy in and no synchronisation inside.

    The supply prefix sums over ranks are left to the callers: a full [N, E] cumsum
    along ranks costs more than the rest of a per-rank view, which needs one row
    (send) or S columns (recv) of it.
    """
    if placement.dim() != 2 or placement.is_floating_point():
        raise ValueError(
            f"placement must be a 2-D integer tensor [N, S], got {placement.dtype} {tuple(placement.shape)}"
        )
    n, s = placement.shape
    if tokens.dim() != 2 or tokens.is_floating_point() or tokens.shape[0] != n:
        raise ValueError(
            f"tokens must be a 2-D integer tensor [N={n}, E] matching placement's ranks, "
            f"got {tokens.dtype} {tuple(tokens.shape)}"
        )
    if rule not in SPLIT_RULES:
        raise ValueError(f"split rule must be one of {SPLIT_RULES}, got {rule!r}")
    e = tokens.shape[1]
    tokens = tokens.to("cpu", torch.int64)
    placement = placement.to("cpu", torch.int64)
    slot_expert = placement.flatten()
    if bool((slot_expert < 0).any() | (slot_expert >= e).any()):
        raise ValueError(f"placement holds expert ids outside [0, {e})")
    if bool(tokens.min() < 0):
        raise ValueError("tokens must be non-negative")
    f = n * s
    counts = torch.bincount(slot_expert, minlength=e)
    total = tokens.sum(0)
    if bool(((counts == 0) & (total > 0)).any()):
        raise ValueError("tokens are routed to an expert that has no slot in placement")
    if rule == "replica":
        quota = _replica_quota(total, slot_expert, counts)
    else:
        quota = _rank_quota(tokens, placement, total)

    # A rank feeds its own replicas first, earlier local slots of the same expert first,
    # so tokens for a locally hosted expert only cross the network on overflow.
    q = quota.view(n, s)
    same = placement[:, :, None] == placement[:, None, :]
    earlier = torch.ones(s, s, dtype=torch.bool).tril(-1)
    before = ((same & earlier) * q[:, None, :]).sum(-1)
    local = (tokens.gather(1, placement) - before).clamp(min=0).minimum(q).flatten()

    # Residual demands of each expert's slots, in flat order, as intervals on its number line.
    order = torch.argsort(slot_expert, stable=True)
    first_of = (counts.cumsum(0) - counts)[slot_expert[order]]  # sorted position of the expert's first slot
    demand = quota - local
    d_sorted = demand[order]
    csum = d_sorted.cumsum(0)
    demand_hi = torch.empty_like(demand)
    demand_hi[order] = csum - (csum - d_sorted)[first_of]
    supply = tokens.flatten().scatter_add(0, torch.arange(f) // s * e + slot_expert, -local).view(n, e)
    return _SplitState(slot_expert, local, demand_hi - demand, demand_hi, supply, q.sum(1))


def _overlap(a_lo: torch.Tensor, a_hi: torch.Tensor, b_lo: torch.Tensor, b_hi: torch.Tensor) -> torch.Tensor:
    # Northwest-corner rule: source i sends to slot j the intersection of its residual
    # supply interval with j's residual demand interval on the expert's number line.
    return (torch.minimum(a_hi, b_hi) - torch.maximum(a_lo, b_lo)).clamp(min=0)


def split_plan(tokens: torch.Tensor, placement: torch.Tensor, rule: str = "rank") -> torch.Tensor:
    """How many tokens each source rank sends to each flat slot.

    tokens: [N, E] int, tokens[i, e] = (token, expert) pairs rank i routed to e.
    placement: [N, S] expert ids. Returns int64 [N, N*S] on placement's device; plan[i, j] =
    tokens rank i sends to flat slot j.

    First each slot's quota (pairs it computes), by ``rule``:

    * ``"rank"`` (default): the slots of e on one rank are one pool, and the pools' shares are
      an exact solution of: minimise the largest rank total, then keep the most pairs on their
      source rank (``_rank_quota``). A pool's first slot takes its share, the others none.
    * ``"replica"`` (the paper's): the c_e slots of expert e share T_e = tokens[:, e].sum() as
      T_e // c_e, plus one for the first T_e % c_e of them in flat slot order.

    Then a rank first fills its own slots of e (up to their quotas); leftover supplies, in
    rank order, meet leftover demands, in flat slot order, by the northwest-corner rule.
    O(N * N*S) memory: for large N use rank_plan.
    """
    st = _split_state(tokens, placement, rule)
    n, s = placement.shape
    se = st.slot_expert
    hi = st.supply.cumsum(0)
    plan = _overlap((hi - st.supply)[:, se], hi[:, se], st.demand_lo[None], st.demand_hi[None])
    j = torch.arange(n * s)
    plan[j // s, j] += st.local
    return plan.to(placement.device)


class RankPlan(NamedTuple):
    send: torch.Tensor  # [N*S] pairs this rank sends to each flat slot
    recv: torch.Tensor  # [S, N] pairs each local slot receives from each source rank
    totals: torch.Tensor  # [N] pairs every rank computes (all ranks: the realised load)


def rank_plan(
    tokens: torch.Tensor, placement: torch.Tensor, rank: int, rule: str = "rank"
) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``rank`` sends and receives under split_plan, without building it.

    tokens: [N, E]; placement: [N, S]. Returns ``(send [N*S], recv [S, N])``, int64:
    ``send == split_plan(...)[rank]`` and ``recv[s, i] == split_plan(...)[i, rank * S + s]``.
    """
    return rank_plan_with_totals(tokens, placement, rank, rule)[:2]


def rank_plan_with_totals(tokens: torch.Tensor, placement: torch.Tensor, rank: int, rule: str = "rank") -> RankPlan:
    """``rank_plan`` plus every rank's total; outputs on the device of ``placement``."""
    n, s = placement.shape
    if not 0 <= rank < n:
        raise ValueError(f"rank must be in [0, {n}), got {rank}")
    st = _split_state(tokens, placement, rule)
    se = st.slot_expert
    hi = st.supply[: rank + 1].sum(0)
    send = _overlap((hi - st.supply[rank])[se], hi[se], st.demand_lo, st.demand_hi)
    mine = slice(rank * s, (rank + 1) * s)
    send[mine] += st.local[mine]
    supply = st.supply[:, se[mine]].T  # [S, N]
    hi = supply.cumsum(1)
    recv = _overlap(hi - supply, hi, st.demand_lo[mine, None], st.demand_hi[mine, None])
    recv[:, rank] += st.local[mine]
    dev = placement.device
    return RankPlan(send.to(dev), recv.to(dev), st.totals.to(dev))


def send_counts(tokens: torch.Tensor, placement: torch.Tensor, rank: int, rule: str = "rank") -> torch.Tensor:
    """Row ``rank`` of split_plan without building it. tokens: [N, E]; returns int64 [N*S]."""
    return rank_plan(tokens, placement, rank, rule)[0]


def recv_counts(tokens: torch.Tensor, placement: torch.Tensor, rank: int, rule: str = "rank") -> torch.Tensor:
    """Tokens ``rank``'s local slots receive from each source rank: int64 [S, N] (see rank_plan)."""
    return rank_plan(tokens, placement, rank, rule)[1]


def replica_capacity(
    num_tokens: int, topk: int, replicas: torch.Tensor, num_slots: int, capacity_factor: float
) -> torch.Tensor:
    """Pairs each expert may take from one rank's ``num_tokens`` tokens, int64 [E].

    Each of the ``num_slots`` slots holds ``capacity_factor * topk * num_tokens / num_slots``
    pairs, so expert e (``replicas[e]`` slots) takes ``ceil(cf * k * T * r_e / num_slots)``.
    With one slot per expert this is Megatron's ``get_capacity(T * k, E, cf)``.
    """
    exact = capacity_factor * topk * num_tokens * replicas.to(torch.float64) / num_slots
    # Round before ceil so that, e.g., 1.1 * 10 = 11.000000000000002 is 11, as in exact arithmetic.
    return torch.ceil(torch.round(exact, decimals=9)).to(torch.int64)


def drop_over_capacity(
    probs: torch.Tensor, routing_map: torch.Tensor, capacity: torch.Tensor, policy: str = "probs"
) -> torch.Tensor:
    """Routing map with the pairs over each expert's capacity removed, bool [T, E].

    probs: [T, E] router probabilities; routing_map: bool [T, E]; capacity: int [E].
    ``policy="probs"`` keeps each expert's highest-probability pairs (ties: earlier token),
    ``"position"`` keeps its earliest tokens: Megatron's two drop policies, per-expert capacity.
    """
    if policy == "probs":
        score = torch.where(routing_map, probs.float(), torch.full_like(probs, -1.0, dtype=torch.float32))
        order = torch.argsort(score, dim=0, descending=True, stable=True)
        rank = torch.empty_like(order)
        positions = torch.arange(order.shape[0], device=order.device).unsqueeze(1).expand_as(order)
        rank.scatter_(0, order, positions)
    elif policy == "position":
        rank = routing_map.long().cumsum(0) - 1
    else:
        raise ValueError(f"drop policy must be 'probs' or 'position', got {policy!r}")
    return routing_map & (rank < capacity.to(rank.device).unsqueeze(0))
