"""Expert replica placement and per-micro-batch token split for SwiftMoE (arXiv 2504.19925).

N ranks each hold S expert slots; flat slot ``j`` (0 <= j < F = N*S) is local slot ``j % S`` of
rank ``j // S``, and a placement is an int64 ``[N, S]`` tensor of expert ids. The slots of one
expert on one rank are a *pool*; every expert has at least one slot.

Every function is pure tensor code on its inputs' device, with no Python loop over experts,
ranks, slots or pairs (``place`` loops over its S dealing rounds and a fixed number of swap
passes), and deterministic: ranks that call them with the same (all-reduced / all-gathered)
inputs get bit-identical results, so no collective is needed to agree on a plan. Outputs that
ranks exchange are integers; the only floating point (``place``'s loads, the balancing rounds
of ``rank_quota``) is float64 elementwise arithmetic, scans and per-expert segment reductions
(``torch.segment_reduce``: no atomics), whose results do not depend on thread counts.

The split of one micro-batch (``plan_split`` + ``source_sends``) needs, per rank: the per-expert
totals ``[E]``, the pairs of each expert routed by lower ranks ``[E]`` (both from one
all-reduce-and-exclusive-scan, ``dispatcher.allreduce_exscan``) and every rank's own pairs of
the experts of its slots ``[N, S]`` (one all-gather). Per-slot quotas follow from the totals and
the placement alone; each rank keeps its own pairs up to its slots' quotas and the remaining
pairs of expert e meet the slots' remaining quotas on one number line, sources in rank order,
slots in (rank, slot) order: source i's remote pairs of e are positions [P_i, P_i + r_i), where
P_i counts the remote pairs of e of ranks below i, and slot k takes the overlap with its
interval. Every slot so receives exactly its quota: realised rank totals are the quotas.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

__all__ = [
    "check_layout",
    "replica_capacity",
    "drop_over_capacity",
    "replica_counts",
    "load_counts",
    "place",
    "place_contiguous",
    "rank_loads",
    "SPLIT_RULES",
    "SplitLayout",
    "split_layout",
    "SplitPlan",
    "rank_quota",
    "replica_quota",
    "plan_split",
    "source_index",
    "source_sends",
    "split_lower_bound",
    "split_plan",
]

SPLIT_RULES = ("rank", "replica")
#: Balancing rounds of ``rank_quota`` (measured: ``scripts/bench_placement.py --families``).
QUOTA_ROUNDS = 4
QUOTA_STEP = 1.0
#: ``place``: noise on the rank loads before each dealing round, relative to the round's median
#: replica weight, and the number of heavy/light swap passes after the rounds.
PLACE_JITTER = 0.005
PLACE_SWAP_PASSES = 4
_SWAP_PAIRS = 64  # heaviest (and lightest) ranks a swap pass looks at: bounds its cost


def check_layout(num_experts: int, num_ranks: int, slots_per_rank: int, topk: int | None = None) -> None:
    """Raise ValueError naming the offending setting if the layout cannot work."""
    if num_experts < 1:
        raise ValueError(f"num_moe_experts must be >= 1, got {num_experts}")
    _check_layout_args(num_ranks, slots_per_rank)
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


def _check_layout_args(num_ranks: int, slots_per_rank: int) -> None:
    if slots_per_rank < 1:
        raise ValueError(f"slots_per_rank must be >= 1, got {slots_per_rank}")
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")


def _check_popularity(popularity: torch.Tensor) -> None:
    if popularity.dim() != 1 or popularity.numel() == 0:
        raise ValueError(f"popularity must be a non-empty 1-D tensor [E], got shape {tuple(popularity.shape)}")
    if popularity.is_floating_point() and not bool(torch.isfinite(popularity).all()):
        raise ValueError("popularity contains NaN or inf")
    if bool((popularity < 0).any()):
        raise ValueError("popularity must be non-negative")


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


def _weights(popularity: torch.Tensor) -> torch.Tensor:
    """float64 popularity, all zero counting as uniform."""
    pop = popularity.detach().to(torch.float64)
    return pop if bool(pop.sum() > 0) else torch.ones_like(pop)


# ---------------------------------------------------------------- replica counts


def replica_counts(popularity: torch.Tensor, num_slots: int) -> torch.Tensor:
    """The paper's rule: replicas per expert proportional to popularity, int64 [E] >= 1 summing
    to ``num_slots``.

    popularity: [E] non-negative tokens per expert (int or float).

    With goal_e = popularity_e / sum(popularity) * num_slots (num_slots / E if the sum is 0),
    counts start at max(floor(goal), 1). A shortfall is filled one slot at a time to the
    largest goal - count, an excess is removed one slot at a time from the largest count - goal
    among counts > 1; ties go to the lowest expert id. If every goal_e >= 1, |counts_e - goal_e|
    < 1; otherwise 1 <= counts_e <= max(ceil(goal_e), 1). goal_a > goal_b implies counts_a >=
    counts_b.
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
        goal = pop * num_slots / total  # multiply first: integer popularities give exact goals
    else:
        goal = torch.full_like(pop, num_slots / num_experts)
    counts = goal.floor().to(torch.int64).clamp(min=1)
    excess = int(counts.sum()) - num_slots
    # Each added slot drops its expert's remainder below every untouched one, so the greedy
    # equals taking the top remainders at once (repeated only if rounding left >= E short).
    while excess < 0:
        k = min(-excess, num_experts)
        idx = torch.argsort(goal - counts, descending=True, stable=True)[:k]
        counts[idx] += 1
        excess += k
    # Removing one slot from every eligible expert is one full greedy sweep: sweep while the
    # eligible set is unchanged, then a partial sweep in greedy order.
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


def load_counts(popularity: torch.Tensor, num_ranks: int, slots_per_rank: int) -> torch.Tensor:
    """Replica counts that minimise the largest load per host, popularity_e / counts_e.

    popularity: [E] non-negative (int or float; all zero counts as uniform). Returns int64 [E]
    on popularity's device, every entry >= 1, summing to exactly N*S.

    The split treats an expert's slots on one rank as one pool, so what spreads its load is the
    number of *ranks* hosting it: counts are host counts in [1, N] while S <= E. They are the
    greedy (each further slot to the largest popularity_e / counts_e below N; ties: lowest id),
    which is exact for this separable min-max problem:

        lambda* = max_e p_e / c_e = min { max_e p_e / c_e : 1 <= c_e <= N, sum_e c_e = N*S },

    and with P = sum(p), F = N*S: max(P / F, max_e p_e / N) <= lambda* <= max(P / (F - E),
    max_e p_e / N) for F > E. lambda* bounds the largest rank load of any placement under either
    split from below. Counts are monotone (p_a > p_b, or equal and a < b, gives c_a >= c_b).
    When S > E every expert is on every rank and the S - E spare slots of each rank hold whole
    extra rounds of N copies, hottest experts first.

    Vectorised: a float threshold takes all copies of priority >= lam (where sum_e min(N - 1,
    p_e / lam) = budget); the few left (fewer than E) are ranked exactly in one sort.
    """
    _check_popularity(popularity)
    _check_layout_args(num_ranks, slots_per_rank)
    n, e = num_ranks, popularity.numel()
    f = n * slots_per_rank
    device = popularity.device
    if f < e:
        raise ValueError(
            f"num_ranks * slots_per_rank ({num_ranks} * {slots_per_rank} = {f}) must be >= number of "
            f"experts ({e}): every expert needs at least one replica; raise slots_per_rank or the number of ranks"
        )
    pop = _weights(popularity)
    if f >= e * n:
        spare = slots_per_rank - e
        position = torch.empty(e, dtype=torch.int64, device=device)
        position[torch.argsort(pop, descending=True, stable=True)] = torch.arange(e, device=device)
        return (1 + spare // e + (position < spare % e).to(torch.int64)) * n
    budget, positive = f - e, pop > 0  # copies beyond the first; the k-th extra of e has priority p_e / k
    if budget == 0:
        return torch.ones(e, dtype=torch.int64, device=device)
    if budget >= int(positive.sum()) * (n - 1):
        # Every popular expert on every rank; the rest to idle experts, lowest id first (their
        # priorities are all 0), as the greedy would.
        extra = torch.where(positive, n - 1, 0)
        idle = torch.cumsum((~positive).to(torch.int64), 0) - 1  # rank among the idle experts
        left = budget - int(positive.sum()) * (n - 1)
        return 1 + torch.where(positive, extra, (left - idle * (n - 1)).clamp(0, n - 1))
    # lam: with the j most popular experts capped, lam_j = (popularity of the others) / (budget -
    # (N - 1) j); the right j is the first whose next expert stays below the cap.
    q = torch.sort(pop, descending=True).values
    j = torch.arange(e, dtype=torch.float64, device=device)
    room = budget - (n - 1) * j
    lam_j = (q.sum() - torch.cumsum(q, 0) + q) / room.clamp(min=1)
    fits = (room > 0) & (q < (n - 1) * lam_j)
    lam = lam_j[torch.argmax(fits.to(torch.int8))] if bool(fits.any()) else pop.sum() / budget
    # Exactly the copies with priority >= lam (float-exact: p_e / k >= lam for k <= extra_e).
    extra = torch.floor(pop / lam).clamp(0, n - 1).to(torch.int64)
    for _ in range(2):
        extra -= ((extra >= 1) & (pop / extra.clamp(min=1) < lam)).to(torch.int64)
        extra += ((extra < n - 1) & (pop / (extra + 1) >= lam)).to(torch.int64)
    short = budget - int(extra.sum())
    if short > 0:  # the next copies in greedy order: those not below the short-th largest next
        # priority (one more per expert for float safety), ranked exactly in one sort
        upcoming = torch.where((extra < n - 1) & positive, pop / (extra + 1), -1.0)
        bar = torch.topk(upcoming, min(short, e)).values[-1]
        more = (torch.floor(pop / bar) - extra + 1).clamp(0).minimum(n - 1 - extra).to(torch.int64)
        more = torch.where(positive, more, 0)
        expert = torch.repeat_interleave(torch.arange(e, device=device), more)
        k = extra[expert] + 1 + torch.arange(expert.numel(), device=device) - (torch.cumsum(more, 0) - more)[expert]
        take = torch.argsort(pop[expert] / k, descending=True, stable=True)[:short]  # ties: lowest id, then k
        extra += torch.bincount(expert[take], minlength=e)
    elif short < 0:  # float rounding took too many: drop the lowest taken, highest id first
        k = (extra[:, None] - torch.arange(0, -short, device=device)).clamp(min=0)  # [E, -short]
        priority = torch.where(k >= 1, pop[:, None] / k.clamp(min=1), torch.inf).flip(0).flatten()
        drop = torch.argsort(priority, stable=True)[:-short]
        extra -= torch.bincount(e - 1 - drop // (-short), minlength=e)
    return 1 + extra


# ---------------------------------------------------------------- placement


def place_contiguous(counts: torch.Tensor, num_ranks: int, slots_per_rank: int) -> torch.Tensor:
    """The paper's layout: replicas laid out expert by expert over the flat slot list.

    counts: [E] int, sum N*S. Returns int64 [N, S] expert ids.
    """
    _check_counts(counts, num_ranks, slots_per_rank)
    experts = torch.arange(counts.numel(), device=counts.device)
    return torch.repeat_interleave(experts, counts.to(torch.int64)).view(num_ranks, slots_per_rank)


@functools.lru_cache(maxsize=8)
def _jitter(num_ranks: int, rounds: int, device: torch.device) -> torch.Tensor:
    """Fixed pseudo-random numbers in [0, 1), [rounds, N] (an integer hash): the same on every
    rank and device. Cached: callers must not write to it."""
    x = (torch.arange(rounds * num_ranks, device=device, dtype=torch.int64).view(rounds, num_ranks) * 0x9E3779B1) & 0xFFFFFFFF
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & 0xFFFFFFFF
    x = ((x ^ (x >> 12)) * 0x297A2D39) & 0xFFFFFFFF
    return (x ^ (x >> 15)).to(torch.float64) / 2**32


def place(
    popularity: torch.Tensor,
    counts: torch.Tensor,
    num_ranks: int,
    slots_per_rank: int,
    swap_passes: int = PLACE_SWAP_PASSES,
    jitter: float = PLACE_JITTER,
) -> torch.Tensor:
    """Balanced placement of ``counts[e]`` replicas of each expert onto N ranks x S slots.

    popularity: [E] tokens per expert; counts: [E] int >= 1 summing to N*S.
    Returns int64 [N, S] expert ids on counts' device, each rank's slots sorted by expert id.

    A replica of e weighs w_e = popularity_e / counts_e (the equal split). Replicas, heaviest
    first (ties: lowest expert id), are dealt in S rounds of N: round k gives its i-th heaviest
    replica to the i-th lightest rank (longest processing time, one round at a time). Only the
    first expert of a round can have copies in the round before; ranks already holding
    ceil(counts_e / N) of them take it last, so no rank holds two copies while counts_e <= N
    (unless the straddling copies outnumber the other ranks). The loads are sorted with a small
    fixed jitter (``jitter`` x the round's median weight): without it, ranks whose loads tie take
    consecutive replicas round after round and end up holding the same experts, a placement in
    which the split balances slowly and less (``rank_quota``).

    Then ``swap_passes`` passes: the i-th heaviest rank swaps a replica with the i-th lightest
    where that brings both closer to their mean, each pair taking the swap that balances it
    best and creating no duplicate. Loop: S rounds and a fixed number of passes, each a handful
    of tensor operations over [N] or [P, S, S] (P <= 64 pairs, found by two top-k).
    """
    _check_counts(counts, num_ranks, slots_per_rank)
    if popularity.shape != counts.shape:
        raise ValueError(f"popularity shape {tuple(popularity.shape)} must match counts shape {tuple(counts.shape)}")
    _check_popularity(popularity)
    n, s, device = num_ranks, slots_per_rank, counts.device
    counts = counts.to(torch.int64)
    weight = _weights(popularity.to(device)) / counts
    heaviest = torch.argsort(weight, descending=True, stable=True)  # ties: lowest id
    items = torch.repeat_interleave(heaviest, counts.index_select(0, heaviest), output_size=n * s).view(s, n)
    item_weight = weight.index_select(0, items.view(-1)).view(s, n)
    cap = -(-counts // n)
    first = items[:, 0].contiguous()  # the only expert of a round that can straddle two
    first_cap = cap.index_select(0, first)
    # No sums: exact whatever the reduction order (every rank must get the same keys).
    penalty = 2 * s * weight.max() + 1.0  # ranks full for it sort last
    shake = jitter * item_weight[:, n // 2, None] * _jitter(n, s, device)  # [S, N]; the round's median
    out = torch.empty(n, s, dtype=torch.int64, device=device)
    load = torch.zeros(n, dtype=torch.float64, device=device)
    straddles = [False] + (items[1:, 0] == items[:-1, -1]).tolist()
    for k in range(s):
        key = load + shake[k]
        if straddles[k]:
            key += penalty * ((out[:, :k] == first[k]).sum(1) >= first_cap[k])
        ranks = torch.argsort(key, stable=True)
        out[:, k].index_copy_(0, ranks, items[k])
        load.index_add_(0, ranks, item_weight[k])  # a permutation: one addition per rank
    single = bool((cap == 1).all())
    # With one slot per rank a swap exchanges two ranks' loads: it never brings both closer.
    for shift in range(swap_passes if n > 1 and s > 1 else 0):
        _swap_pass(out, weight, cap, single, load, shift)
    return out.sort(dim=1).values


def _swap_pass(
    out: torch.Tensor, weight: torch.Tensor, cap: torch.Tensor, single: bool, load: torch.Tensor, shift: int
) -> None:
    """One pass of heavy/light swaps on ``out`` [N, S] and ``load`` [N], in place: the
    ``_SWAP_PAIRS`` heaviest ranks, heaviest first, each with one of as many lightest (lightest
    first, rotated by ``shift``: another partner each pass)."""
    n, s = out.shape
    pairs = min(_SWAP_PAIRS, n // 2)
    # Two top-k, not a sort (~10x cheaper at N = 4096); the light ones exclude the heavy ones even
    # where loads tie.
    heavy = torch.topk(load, pairs).indices
    light = torch.topk(load.index_fill(0, heavy, torch.inf), pairs, largest=False).indices.roll(shift)
    a, b = out.index_select(0, heavy), out.index_select(0, light)  # [P, S] each
    gap = (load.index_select(0, heavy) - load.index_select(0, light)).view(pairs, 1, 1)
    # [P, S, S]: heavy slot i <-> light slot j
    d = weight.index_select(0, a.view(-1)).view(pairs, s, 1) - weight.index_select(0, b.view(-1)).view(pairs, 1, s)
    # Both ranks end closer to their mean iff 0 < d < gap, i.e. |gap - 2d| < gap: the new gap.
    score = (gap - 2 * d).abs_()
    ok = score < gap
    same = a.view(pairs, s, 1) == b.view(pairs, 1, s)
    if single:  # no rank may hold two copies
        ok &= ~(same.any(2, keepdim=True) | same.any(1, keepdim=True))
    else:
        ok &= (same.sum(2, keepdim=True) < cap.index_select(0, a.view(-1)).view(pairs, s, 1)) & (
            same.sum(1, keepdim=True) < cap.index_select(0, b.view(-1)).view(pairs, 1, s)
        )
    score = score.masked_fill_(~ok, torch.inf).view(pairs, s * s)
    best = score.argmin(1, keepdim=True)  # (Tensor.min(dim) is ~1000x slower on small CPU tensors, torch 2.13)
    take = score.gather(1, best) < torch.inf  # [P, 1]
    i, j = best // s, best % s
    x, y = a.gather(1, i), b.gather(1, j)
    out.index_copy_(0, heavy, a.scatter_(1, i, torch.where(take, y, x)))
    out.index_copy_(0, light, b.scatter_(1, j, torch.where(take, x, y)))
    moved = d.view(pairs, s * s).gather(1, best).mul_(take).view(pairs)
    load.index_add_(0, heavy, moved, alpha=-1).index_add_(0, light, moved)


def rank_loads(popularity: torch.Tensor, placement: torch.Tensor) -> torch.Tensor:
    """Expected tokens per rank under the equal split: sum over its slots of popularity_e /
    (replicas of e). popularity: [E]; placement: [N, S]. Returns float64 [N]."""
    counts = torch.bincount(placement.flatten(), minlength=popularity.numel()).clamp(min=1)
    weight = popularity.to(device=placement.device, dtype=torch.float64) / counts
    return weight[placement].sum(1)


# ---------------------------------------------------------------- split


class SplitLayout(NamedTuple):
    """What the split needs of a placement [N, S] (``split_layout``, once per placement).

    "Sorted" order lists the F slots by (expert, rank, slot): each expert's slots form one
    segment, the slots of one pool are adjacent in it, and segment-wise sums are scans.
    """

    num_ranks: int
    slots_per_rank: int
    slot_expert: torch.Tensor  # [F] expert of each flat slot
    by_expert: torch.Tensor  # [F] flat slot at each sorted position
    position: torch.Tensor  # [F] sorted position of each flat slot (the inverse of by_expert)
    sorted_expert: torch.Tensor  # [F] expert at each sorted position
    sorted_key: torch.Tensor  # [F] expert * N + rank at each sorted position (non-decreasing)
    sorted_rank: torch.Tensor  # [F] rank at each sorted position
    bounds: torch.Tensor  # [E + 1] first sorted position of each expert, then F
    segment_start: torch.Tensor  # [F] sorted: bounds[expert]
    pool_start: torch.Tensor  # [F] sorted: position of the first slot of the slot's pool
    occurrence: torch.Tensor  # [F] flat: index of the slot among its expert's slots
    slots: torch.Tensor  # [F] flat: slots of the slot's expert
    # Slot-major [S, N] copies for rank_quota, whose rank totals are then sums over the first dim
    # (twice as fast as over the last on CPU):
    slot_major_expert: torch.Tensor  # [F] expert of slot s of rank r at s * N + r
    slot_major_by_expert: torch.Tensor  # [F] slot-major index at each sorted position
    share: torch.Tensor  # [S, N] float64: 1 / (ranks hosting the expert) on a pool's first slot, else 0
    flexible: torch.Tensor  # [S, N] float64: 1 on a pool's first slot of an expert on two or more ranks, else 0


def split_layout(placement: torch.Tensor, num_experts: int) -> SplitLayout:
    """placement: int [N, S] expert ids in [0, E). Sorts and checks once per placement."""
    if placement.dim() != 2 or placement.is_floating_point():
        raise ValueError(
            f"placement must be a 2-D integer tensor [N, S], got {placement.dtype} {tuple(placement.shape)}"
        )
    n, s = placement.shape
    e, device = num_experts, placement.device
    flat = placement.flatten().to(torch.int64)
    if bool((flat < 0).any() | (flat >= e).any()):
        raise ValueError(f"placement holds expert ids outside [0, {e})")
    index = torch.arange(n * s, device=device)
    by_expert = torch.argsort(flat, stable=True)  # flat order is (rank, slot) order already
    position = torch.empty_like(index).index_copy_(0, by_expert, index)
    sorted_expert = flat.index_select(0, by_expert)
    rank = torch.arange(n, device=device).repeat_interleave(s)
    sorted_rank = rank.index_select(0, by_expert)
    sorted_key = sorted_expert * n + sorted_rank
    slots = torch.bincount(flat, minlength=e)
    bounds = _exclusive_cumsum(slots)
    new_pool = torch.ones(n * s, dtype=torch.bool, device=device)
    new_pool[1:] = sorted_key[1:] != sorted_key[:-1]
    pool_start = torch.cummax(torch.where(new_pool, index, 0), 0).values
    first_of_pool = new_pool.index_select(0, position)
    hosts = torch.bincount(sorted_expert[new_pool], minlength=e).index_select(0, flat)
    segment_start = bounds.index_select(0, sorted_expert)
    slot_major = lambda values: values.view(n, s).t().contiguous()  # noqa: E731
    flat_to_slot_major = index.view(s, n).t().reshape(-1)  # flat r * S + k -> k * N + r
    return SplitLayout(
        n, s, flat, by_expert, position, sorted_expert, sorted_key, sorted_rank, bounds, segment_start, pool_start,
        position - segment_start.index_select(0, position), slots.index_select(0, flat), slot_major(flat).view(-1),
        flat_to_slot_major.index_select(0, by_expert),
        slot_major(first_of_pool / hosts.clamp(min=1)), slot_major((first_of_pool & (hosts > 1)).to(torch.float64)),
    )


def _segment_sum(sorted_values: torch.Tensor, layout: SplitLayout) -> torch.Tensor:
    """[F] values in sorted order -> [E] sums per expert. Deterministic on every device: each
    segment is reduced on its own, without atomics (a loop on CPU, CUB's segmented reduction on
    CUDA)."""
    return torch.segment_reduce(sorted_values, "sum", offsets=layout.bounds)


def replica_quota(totals: torch.Tensor, layout: SplitLayout) -> torch.Tensor:
    """The paper's split: the c_e slots of e share T_e as T_e // c_e, plus one for the first
    T_e % c_e of them in flat slot order. totals: int [E]. Returns int64 [F], flat."""
    t = totals.to(torch.int64).index_select(0, layout.slot_expert)
    return t // layout.slots + (layout.occurrence < t % layout.slots).to(torch.int64)


def rank_quota(
    totals: torch.Tensor, layout: SplitLayout, rounds: int = QUOTA_ROUNDS, step: float = QUOTA_STEP
) -> torch.Tensor:
    """Pairs each slot computes, balancing rank totals: int64 [F], flat, summing to ``totals``
    [E] per expert. An expert's slots on one rank are one pool, whose first slot takes it all.

    Starts from the equal split over an expert's pools, then ``rounds`` rounds of weighted
    diffusion: pool p of expert e on rank r moves by ``step`` * w_p (m_e - L_r), L_r the rank's
    total and m_e the w-weighted mean of L over e's pools, so e's total is unchanged (pools
    clamp at zero). w_p is T_e over the sum of T of r's pools of experts hosted on two or more
    ranks (0 for one host): a rank's excess goes mostly to its hottest flexible expert, which
    spreads it over the most ranks. If that ends with a larger maximum than the equal split
    (possible where clamping stops the descent), the equal split is kept. Then integers per
    expert (``_round``: cumulative rounding): each pool within 1 of its fractional share, so
    each rank total within S of its fractional one.

    An approximation of the exact min-max (a flow problem), with no worst-case bound beyond the
    equal split's. Measured against the exact optimum (``scripts/bench_placement.py
    --families``: 10^6 pairs, placements from ``place`` with E <= N*S <= 16384, 3 seeds): the
    largest rank total is on average 0.00-0.32% above it per popularity family, 6.8% of cases
    more than 0.5%, the worst 14.5%. The bad cases have S = 2, where the optimum needs flow along
    long paths: 4-5% after 4 rounds at zipf 1.2-1.5, N = 64-1024, which 64-256 rounds close.
    It relies on a placement that mixes: where many ranks hold the same experts (``place`` with
    ``jitter=0``, the paper's contiguous layout), a few rounds leave more (measured: 1.1% above
    the optimum at E = 256, N = 1024, S = 4, zipf 1, without the jitter; 0.06% with it).
    """
    return _sorted_rank_quota(totals, layout, rounds, step).index_select(0, layout.position)


def _sorted_rank_quota(totals: torch.Tensor, layout: SplitLayout, rounds: int, step: float) -> torch.Tensor:
    """``rank_quota`` in sorted order. Works on slot-major [S, N] shares: rank totals are sums
    over dim 0."""
    n, s = layout.num_ranks, layout.slots_per_rank
    to_sorted = layout.slot_major_by_expert
    slot_t = totals.index_select(0, layout.slot_major_expert).view(s, n)
    x = slot_t * layout.share
    w = slot_t * layout.flexible
    w /= w.sum(0).clamp_(min=1.0)  # totals are integers: a positive sum is >= 1
    # The mean's weights in sorted order: w over its sum per expert.
    w_sorted = w.view(-1).index_select(0, to_sorted)
    w_mean = w_sorted / _segment_sum(w_sorted, layout).clamp_(min=1e-300).index_select(0, layout.sorted_expert)
    w_step = w * step if step != 1.0 else w
    load = x.sum(0)
    equal, equal_max = x, load.max()
    for _ in range(rounds):
        mean = _segment_sum(w_mean * load.index_select(0, layout.sorted_rank), layout)
        x = x.addcmul(w_step, mean.index_select(0, layout.slot_major_expert).view(s, n) - load).clamp_(min=0.0)
        load = x.sum(0)
    # Never worse than where it started (clamping breaks the diffusion's descent on rare
    # structures). Clamping only adds to an expert's shares, which _round scales back to its
    # total: the unscaled maximum bounds the scaled one from above.
    x = torch.where(load.max() > equal_max, equal, x)
    return _round(x.view(-1).index_select(0, to_sorted), totals, layout)


def _round(shares: torch.Tensor, totals: torch.Tensor, layout: SplitLayout) -> torch.Tensor:
    """Integer quotas from non-negative shares [F] in sorted order, positive somewhere for every
    T_e > 0, and integer totals [E]: per expert, T_e * (its shares so far / all of them)
    rounded, differenced. Each quota is within 1 of its scaled share, and each expert's sum to
    T_e exactly: at the end of e's segment the value is w * (T_e / w) for one float w, within an
    ulp of T_e, which rounds to T_e below 2^52."""
    scan = _exclusive_cumsum(shares)
    ends = scan.index_select(0, layout.bounds)
    ratio = (totals / torch.diff(ends).clamp_(min=1e-300)).index_select(0, layout.sorted_expert)
    start = ends.index_select(0, layout.sorted_expert)
    # Slot j's cumulative quota through itself (column 1) and through the slot before it (column
    # 0: the same expression, 0 for the first slot of a segment). Nearest, not floor: a floor
    # would give every fraction to each expert's last pool. Integral floats: the difference is exact.
    cumulative = (scan.unfold(0, 2, 1) - start.unsqueeze(1)).mul_(ratio.unsqueeze(1)).add_(0.5).floor_()
    return (cumulative[:, 1] - cumulative[:, 0]).to(torch.int64)


def _exclusive_cumsum(values: torch.Tensor) -> torch.Tensor:
    """[F] -> [F + 1]: 0, then the running sums."""
    scan = values.new_zeros(values.numel() + 1)
    torch.cumsum(values, 0, out=scan[1:])
    return scan


class SplitPlan(NamedTuple):
    """One micro-batch's split, the same on every rank (``plan_split``)."""

    quota: torch.Tensor  # [F] flat: pairs each slot computes (realised: rank totals are quota.view(N, S).sum(1))
    keep: torch.Tensor  # [F] flat: of those, pairs from the slot's own rank
    demand_lo: torch.Tensor  # [F] sorted: each slot's interval on its expert's line of remote pairs
    demand_hi: torch.Tensor  # [F] sorted
    kept_scan: torch.Tensor  # [F + 1] sorted: exclusive scan of keep


def plan_split(totals: torch.Tensor, own: torch.Tensor, layout: SplitLayout, rule: str = "rank") -> SplitPlan:
    """The split of one micro-batch.

    totals: int [E], pairs of each expert over all ranks; own: int [N, S], ``own[r, s]`` = rank
    r's pairs of the expert of its slot s; rule: ``"rank"`` (``rank_quota``) or ``"replica"``
    (``replica_quota``). A rank's slots of e keep its own pairs first, in slot order, each up to
    its quota; the rest of each slot's quota is its interval on e's line of remote pairs.
    """
    if rule not in SPLIT_RULES:
        raise ValueError(f"split rule must be one of {SPLIT_RULES}, got {rule!r}")
    own = own.reshape(-1).to(torch.int64).index_select(0, layout.by_expert)
    if rule == "rank":
        sorted_quota = _sorted_rank_quota(totals, layout, QUOTA_ROUNDS, QUOTA_STEP)
        quota = sorted_quota.index_select(0, layout.position)
        keep = torch.minimum(own, sorted_quota)  # a pool's first slot takes its whole quota
    else:
        quota = replica_quota(totals, layout)
        sorted_quota = quota.index_select(0, layout.by_expert)
        before = torch.cumsum(sorted_quota, 0) - sorted_quota
        earlier_in_pool = before - before.index_select(0, layout.pool_start)
        keep = (own - earlier_in_pool).clamp_(min=0).minimum(sorted_quota)
    demand = sorted_quota - keep
    hi = torch.cumsum(demand, 0)
    hi -= (hi - demand).index_select(0, layout.segment_start)
    return SplitPlan(quota, keep.index_select(0, layout.position), hi - demand, hi, _exclusive_cumsum(keep))


def source_index(layout: SplitLayout, ranks: torch.Tensor) -> torch.Tensor:
    """Sorted positions bounding each source's slots of each expert, int64 [2, B, E]: slots of
    e on ranks below ``ranks[b]`` end at [0, b, e], the source's own at [1, b, e]."""
    n, e = layout.num_ranks, layout.bounds.numel() - 1
    key = torch.arange(e, device=ranks.device) * n + ranks[:, None]
    return torch.searchsorted(layout.sorted_key, torch.stack([key, key + 1]))


def source_sends(
    kept: torch.Tensor, earlier: torch.Tensor, ranks: torch.Tensor, plan: SplitPlan, layout: SplitLayout,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pairs each of B source ranks sends to every flat slot, int64 [B, F].

    kept: int [B, E], the sources' pairs per expert; earlier: int [B, E], pairs of each expert
    routed by ranks below each source (an exclusive scan over ranks); ranks: int [B]; index:
    ``source_index(layout, ranks)`` if already known. Row b sums to kept[b] per expert; column
    j, summed over all N sources, is ``plan.quota[j]``.
    """
    scan = plan.kept_scan
    at_below, at_upto = scan.take(source_index(layout, ranks) if index is None else index)
    kept_below = at_below - scan.index_select(0, layout.bounds[:-1])  # local pairs of e on lower ranks
    remote = kept.to(torch.int64) - (at_upto - at_below)  # minus the source's own kept pairs
    start = (earlier.to(torch.int64) - kept_below).index_select(1, layout.sorted_expert)
    end = start + remote.index_select(1, layout.sorted_expert)
    sends = (torch.minimum(end, plan.demand_hi) - torch.maximum(start, plan.demand_lo)).clamp_(min=0)
    sends = sends.index_select(1, layout.position)
    b, n, s = ranks.numel(), layout.num_ranks, layout.slots_per_rank
    own_keep = plan.keep.view(n, s).index_select(0, ranks).view(b, 1, s)
    sends.view(b, n, s).scatter_add_(1, ranks.view(b, 1, 1).expand(b, 1, s), own_keep)
    return sends


def split_lower_bound(totals: torch.Tensor, layout: SplitLayout, loads: torch.Tensor) -> torch.Tensor:
    """A lower bound on the largest rank total of every split of ``totals`` [E] (int), int64
    scalar: the pairs of experts hosted only inside a set R of ranks land in R, so some rank of
    R takes ceil(their sum / |R|). R runs over the N sets of the most loaded ranks of ``loads``
    [N] (any split's rank totals); for the loads of an optimal split, the bound is the optimum
    (its most loaded ranks are such a set), so realised / bound bounds the gap from above."""
    n, s = layout.num_ranks, layout.slots_per_rank
    order = torch.empty(n, dtype=torch.int64, device=loads.device)
    order[torch.argsort(loads, descending=True, stable=True)] = torch.arange(n, device=loads.device)
    rank = torch.arange(n * s, device=loads.device) // s
    e = totals.numel()
    last = torch.zeros(e, dtype=torch.int64, device=loads.device).scatter_reduce(
        0, layout.slot_expert, order.index_select(0, rank), "amax"
    )
    inside = torch.zeros(n, dtype=torch.int64, device=loads.device).index_add_(0, last, totals.to(torch.int64))
    size = torch.arange(1, n + 1, device=loads.device)
    return (-(-torch.cumsum(inside, 0) // size)).max()


def split_plan(tokens: torch.Tensor, placement: torch.Tensor, rule: str = "rank") -> torch.Tensor:
    """Every rank's sends at once, int64 [N, F]: ``plan[i, j]`` = pairs rank i sends to flat
    slot j, what the N ranks compute together. tokens: int [N, E], rank i's pairs per expert;
    placement: [N, S]. For tests and benchmarks (O(N * N*S) memory)."""
    layout = split_layout(placement, tokens.shape[-1])
    n = placement.shape[0]
    if tokens.dim() != 2 or tokens.is_floating_point() or tokens.shape[0] != n:
        raise ValueError(
            f"tokens must be a 2-D integer tensor [N={n}, E] matching placement's ranks, "
            f"got {tokens.dtype} {tuple(tokens.shape)}"
        )
    if bool((tokens < 0).any()):
        raise ValueError("tokens must be non-negative")
    totals = tokens.sum(0)
    if bool(((torch.diff(layout.bounds) == 0) & (totals > 0)).any()):
        raise ValueError("tokens are routed to an expert that has no slot in placement")
    plan = plan_split(totals, tokens.gather(1, placement.to(torch.int64)), layout, rule)
    earlier = torch.cumsum(tokens, 0) - tokens
    return source_sends(tokens, earlier, torch.arange(n, device=tokens.device), plan, layout)


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
