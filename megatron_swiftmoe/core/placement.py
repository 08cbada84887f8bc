"""Expert replica placement and token split plans for SwiftMoE (arXiv 2504.19925).

Slot convention: ``num_ranks`` (N) ranks each hold ``slots_per_rank`` (S) expert
slots. Flat slot ``j`` (0 <= j < N*S) is local slot ``j % S`` of rank ``j // S``;
a placement is an int64 ``[N, S]`` tensor of expert ids, so ``placement.flatten()``
is the flat slot list. Every slot holds a replica of exactly one expert and every
expert has at least one replica.

All functions are pure torch: no process groups, no hard-coded device (outputs live
on the inputs' device), and deterministic, so every rank that calls them with the
same (all-reduced / all-gathered) inputs gets bit-identical results and no
collective is needed to agree on a placement or plan.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "repeat",
    "check_layout",
    "replica_capacity",
    "drop_over_capacity",
    "replica_counts",
    "place",
    "place_contiguous",
    "rank_loads",
    "split_plan",
    "rank_plan",
    "send_counts",
    "recv_counts",
]


def repeat(values: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``values[i]`` repeated ``counts[i]`` times: ``torch.repeat_interleave`` without its
    multi-threaded CPU kernel, which costs ~0.25 ms a call with 2 threads (vs. ~10 us here).

    values: [K]; counts: int [K], non-negative. Returns [counts.sum()].
    """
    ends = torch.cumsum(counts, 0)
    positions = torch.arange(int(ends[-1]) if ends.numel() else 0, device=values.device)
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


def _check_counts(counts: torch.Tensor, num_ranks: int, slots_per_rank: int) -> None:
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    if slots_per_rank < 1:
        raise ValueError(f"slots_per_rank must be >= 1, got {slots_per_rank}")
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


def place(popularity: torch.Tensor, counts: torch.Tensor, num_ranks: int, slots_per_rank: int) -> torch.Tensor:
    """Balanced placement of ``counts[e]`` replicas of each expert onto N ranks x S slots.

    popularity: [E] tokens per expert; counts: [E] int >= 1 summing to N*S.
    Returns int64 [N, S] expert ids, each rank's slots sorted by expert id.

    Replicas carry load popularity_e / counts_e. They are dealt heaviest first in S
    rounds of N, each round giving the heaviest remaining replicas to the currently
    lightest ranks (a round-based LPT). Replicas of one expert are contiguous in the
    dealing order, so only the first expert of a round can already sit on a rank;
    its replicas go to the lightest ranks holding fewer than ceil(counts_e / N)
    copies of it. Hence no rank holds more than ceil(counts_e / N) copies of e, so
    never two when counts_e <= N (a duplicate would only waste a slot); above that,
    duplicates are unavoidable and load decides where they go.
    """
    _check_counts(counts, num_ranks, slots_per_rank)
    if popularity.shape != counts.shape:
        raise ValueError(f"popularity shape {tuple(popularity.shape)} must match counts shape {tuple(counts.shape)}")
    _check_popularity(popularity)
    n, s = num_ranks, slots_per_rank
    dev = counts.device
    counts = counts.to(torch.int64)
    weight = popularity.to(device=dev, dtype=torch.float64) / counts
    experts = repeat(torch.arange(counts.numel(), device=dev), counts)
    weight = weight[experts]
    # Stable: equal loads keep expert-id order, which keeps each expert contiguous.
    order = torch.argsort(weight, descending=True, stable=True)
    experts, weight = experts[order].view(s, n), weight[order].view(s, n)

    out = torch.empty(n, s, dtype=torch.int64, device=dev)
    load = torch.zeros(n, dtype=torch.float64, device=dev)
    pos = torch.arange(n, device=dev)
    for r in range(s):
        ranks = torch.argsort(load, stable=True)
        if r > 0:
            first = experts[r, 0]
            m = (experts[r] == first).sum()
            cap = (counts[first] + n - 1) // n
            # The first expert's m replicas go to the lightest ranks still below
            # ceil(counts / N) copies of it; everyone else keeps lightest-first order.
            full = (out[:, :r] == first).sum(1) >= cap
            pref = torch.argsort(full[ranks].to(torch.int8), stable=True)
            rank_in_pref = torch.empty_like(pref)
            rank_in_pref[pref] = pos
            key = torch.where(rank_in_pref < m, rank_in_pref, m + pos)
            ranks = ranks[torch.argsort(key)]
        out[ranks, r] = experts[r]
        # Gather-add-scatter with unique indices: no atomics, so bitwise reproducible.
        load[ranks] = load[ranks] + weight[r]
    return out.sort(dim=1).values


def rank_loads(popularity: torch.Tensor, placement: torch.Tensor) -> torch.Tensor:
    """Expected tokens per rank: sum over its slots of popularity_e / (replicas of e).

    popularity: [E]; placement: [N, S] expert ids. Returns float64 [N].
    """
    counts = torch.bincount(placement.flatten(), minlength=popularity.numel()).clamp(min=1)
    weight = popularity.to(device=placement.device, dtype=torch.float64) / counts
    return weight[placement].sum(1)


class _SplitState(NamedTuple):
    slot_expert: torch.Tensor  # [F] expert of each flat slot
    local: torch.Tensor  # [F] tokens slot j takes from its own rank
    demand_lo: torch.Tensor  # [F] residual demand interval of slot j on its expert's number line
    demand_hi: torch.Tensor  # [F]
    supply: torch.Tensor  # [N, E] residual tokens rank i still has to send for expert e


def _split_state(tokens: torch.Tensor, placement: torch.Tensor) -> _SplitState:
    """Local fill, residual demand prefix sums and residual supply shared by the plan views.

    The supply prefix sums over ranks are left to the callers: a full [N, E] cumsum
    along ranks costs more than the rest of a per-rank view, which needs one row
    (send) or S columns (recv) of it.
    """
    if placement.dim() != 2 or placement.is_floating_point():
        raise ValueError(f"placement must be a 2-D integer tensor [N, S], got {placement.dtype} {tuple(placement.shape)}")
    n, s = placement.shape
    if tokens.dim() != 2 or tokens.is_floating_point() or tokens.shape[0] != n:
        raise ValueError(
            f"tokens must be a 2-D integer tensor [N={n}, E] matching placement's ranks, "
            f"got {tokens.dtype} {tuple(tokens.shape)}"
        )
    e = tokens.shape[1]
    tokens = tokens.to(torch.int64)
    slot_expert = placement.flatten().to(torch.int64)
    if bool((slot_expert < 0).any() | (slot_expert >= e).any()):
        raise ValueError(f"placement holds expert ids outside [0, {e})")
    if bool(tokens.min() < 0):
        raise ValueError("tokens must be non-negative")
    f = n * s
    dev = placement.device
    counts = torch.bincount(slot_expert, minlength=e)
    total = tokens.sum(0)
    if bool(((counts == 0) & (total > 0)).any()):
        raise ValueError("tokens are routed to an expert that has no slot in placement")

    # Slots of each expert in flat order: occurrence index and demand prefix sums.
    order = torch.argsort(slot_expert, stable=True)
    first_of = (counts.cumsum(0) - counts)[slot_expert[order]]  # sorted position of the expert's first slot
    arange_f = torch.arange(f, device=dev)
    occ = torch.empty_like(order)
    occ[order] = arange_f - first_of
    t = total[slot_expert]
    c = counts.clamp(min=1)[slot_expert]
    quota = t // c + (occ < t % c).to(torch.int64)

    # A rank feeds its own replicas first, earlier local slots of the same expert first,
    # so tokens for a locally hosted expert only cross the network on overflow.
    q = quota.view(n, s)
    same = placement[:, :, None] == placement[:, None, :]
    earlier = torch.ones(s, s, dtype=torch.bool, device=dev).tril(-1)
    before = ((same & earlier) * q[:, None, :]).sum(-1)
    local = (tokens.gather(1, placement.to(torch.int64)) - before).clamp(min=0).minimum(q).flatten()

    demand = quota - local
    d_sorted = demand[order]
    csum = d_sorted.cumsum(0)
    demand_hi = torch.empty_like(demand)
    demand_hi[order] = csum - (csum - d_sorted)[first_of]
    # Integer scatter_add is exact, hence deterministic even with atomics.
    supply = tokens.flatten().scatter_add(0, (arange_f // s) * e + slot_expert, -local).view(n, e)
    return _SplitState(slot_expert, local, demand_hi - demand, demand_hi, supply)


def _overlap(a_lo: torch.Tensor, a_hi: torch.Tensor, b_lo: torch.Tensor, b_hi: torch.Tensor) -> torch.Tensor:
    # Northwest-corner rule: source i sends to slot j the intersection of its residual
    # supply interval with j's residual demand interval on the expert's number line.
    return (torch.minimum(a_hi, b_hi) - torch.maximum(a_lo, b_lo)).clamp(min=0)


def split_plan(tokens: torch.Tensor, placement: torch.Tensor) -> torch.Tensor:
    """How many tokens each source rank sends to each flat slot.

    tokens: [N, E] int, tokens[i, e] = (token, expert) pairs rank i routed to e.
    placement: [N, S] expert ids. Returns int64 [N, N*S]; plan[i, j] = tokens rank i
    sends to flat slot j.

    Replica quota: the c_e slots of expert e share T_e = tokens[:, e].sum() as
    T_e // c_e, plus one for the first T_e % c_e of them in flat slot order. A rank
    first fills its own replicas of e (up to their quotas); leftover supplies, in
    rank order, meet leftover demands, in flat slot order, by the northwest-corner
    rule. O(N * N*S) memory: for large N use send_counts / recv_counts.
    """
    st = _split_state(tokens, placement)
    n, s = placement.shape
    se = st.slot_expert
    hi = st.supply.cumsum(0)
    plan = _overlap((hi - st.supply)[:, se], hi[:, se], st.demand_lo[None], st.demand_hi[None])
    j = torch.arange(n * s, device=placement.device)
    plan[j // s, j] += st.local
    return plan


def rank_plan(tokens: torch.Tensor, placement: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``rank`` sends and receives under split_plan, without building it.

    tokens: [N, E]; placement: [N, S]. Returns ``(send [N*S], recv [S, N])``, int64:
    ``send == split_plan(...)[rank]`` and ``recv[s, i] == split_plan(...)[i, rank * S + s]``.
    """
    n, s = placement.shape
    if not 0 <= rank < n:
        raise ValueError(f"rank must be in [0, {n}), got {rank}")
    st = _split_state(tokens, placement)
    se = st.slot_expert
    hi = st.supply[: rank + 1].sum(0)
    send = _overlap((hi - st.supply[rank])[se], hi[se], st.demand_lo, st.demand_hi)
    mine = slice(rank * s, (rank + 1) * s)
    send[mine] += st.local[mine]
    supply = st.supply[:, se[mine]].T  # [S, N]
    hi = supply.cumsum(1)
    recv = _overlap(hi - supply, hi, st.demand_lo[mine, None], st.demand_hi[mine, None])
    recv[:, rank] += st.local[mine]
    return send, recv


def send_counts(tokens: torch.Tensor, placement: torch.Tensor, rank: int) -> torch.Tensor:
    """Row ``rank`` of split_plan without building it. tokens: [N, E]; returns int64 [N*S]."""
    return rank_plan(tokens, placement, rank)[0]


def recv_counts(tokens: torch.Tensor, placement: torch.Tensor, rank: int) -> torch.Tensor:
    """Tokens ``rank``'s local slots receive from each source rank: int64 [S, N] (see rank_plan)."""
    return rank_plan(tokens, placement, rank)[1]


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
