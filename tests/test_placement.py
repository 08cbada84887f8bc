"""Tests for megatron_swiftmoe.core.placement (replica counts, placement, split plans, capacity)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_swiftmoe.core.placement import (
    check_layout,
    drop_over_capacity,
    load_counts,
    place,
    place_contiguous,
    plan_split,
    rank_loads,
    rank_quota,
    replica_capacity,
    replica_counts,
    source_sends,
    split_layout,
    split_lower_bound,
    split_plan,
)

pytestmark = pytest.mark.one_version  # not version-dependent: CI's first environment only

FAST = settings(deadline=None, max_examples=200)


def _zipf(num_experts: int, skew: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    prob = torch.arange(1, num_experts + 1, dtype=torch.float64).pow(-skew)
    prob = prob[torch.randperm(num_experts, generator=g)]
    return (prob / prob.sum() * 100_000 * (0.5 + torch.rand(num_experts, generator=g, dtype=torch.float64))).round().long()


@st.composite
def popularity_and_slots(draw: st.DrawFn) -> tuple[torch.Tensor, int]:
    e = draw(st.integers(1, 24))
    pop = draw(st.lists(st.one_of(st.just(0), st.integers(0, 10_000)), min_size=e, max_size=e))
    num_slots = draw(st.integers(e, 6 * e + 5))
    return torch.tensor(pop, dtype=torch.int64), num_slots


@st.composite
def layouts(draw: st.DrawFn) -> tuple[torch.Tensor, int, int]:
    n = draw(st.integers(1, 12))
    s = draw(st.integers(1, 5))
    e = draw(st.integers(1, n * s))
    pop = draw(st.lists(st.integers(0, 10_000), min_size=e, max_size=e))
    return torch.tensor(pop, dtype=torch.int64), n, s


@st.composite
def split_cases(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    """Any placement covering every expert (not necessarily from `place`) and random tokens."""
    n = draw(st.integers(1, 8))
    s = draw(st.integers(1, 4))
    e = draw(st.integers(1, n * s))
    extra = draw(st.lists(st.integers(0, e - 1), min_size=n * s - e, max_size=n * s - e))
    flat = torch.tensor(list(range(e)) + extra, dtype=torch.int64)
    perm = torch.tensor(draw(st.permutations(range(n * s))), dtype=torch.int64)
    placement = flat[perm].view(n, s)
    tokens = draw(st.lists(st.integers(0, 50), min_size=n * e, max_size=n * e))
    return torch.tensor(tokens, dtype=torch.int64).view(n, e), placement


# ---------------------------------------------------------------- check_layout


def test_check_layout_ok() -> None:
    check_layout(8, 4, 2)
    check_layout(8, 4, 2, topk=8)
    check_layout(256, 1024, 4, topk=8)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((8, 4, 0, None), r"slots_per_rank must be >= 1, got 0"),
        ((8, 0, 2, None), r"num_ranks must be >= 1, got 0"),
        ((0, 4, 2, None), r"num_moe_experts must be >= 1, got 0"),
        ((8, 2, 3, None), r"num_ranks \* slots_per_rank \(2 \* 3 = 6\) must be >= num_moe_experts \(8\).*slots_per_rank to >= 4"),
        ((2, 1, 2, 3), r"moe_router_topk \(3\) must be <= num_moe_experts \(2\)"),
        ((2, 1, 2, 0), r"moe_router_topk must be >= 1, got 0"),
    ],
)
def test_check_layout_errors(args: tuple[int, int, int, int | None], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_layout(*args)


# ---------------------------------------------------------------- replica_counts


@FAST
@given(popularity_and_slots())
def test_replica_counts_properties(case: tuple[torch.Tensor, int]) -> None:
    pop, num_slots = case
    counts = replica_counts(pop, num_slots)
    assert counts.dtype == torch.int64 and counts.shape == pop.shape
    assert int(counts.sum()) == num_slots
    assert bool((counts >= 1).all())
    assert torch.equal(counts, replica_counts(pop.clone(), num_slots))
    total = int(pop.sum())
    goal = [p * num_slots / total if total else num_slots / len(pop) for p in pop.tolist()]
    c = counts.tolist()
    if min(goal) >= 1:
        assert all(abs(ci - gi) < 1 for ci, gi in zip(c, goal))
    else:
        assert all(1 <= ci <= max(math.ceil(gi), 1) for ci, gi in zip(c, goal))
    for a in range(len(c)):
        for b in range(len(c)):
            if goal[a] > goal[b]:
                assert c[a] >= c[b]


@FAST
@given(popularity_and_slots())
def test_replica_counts_float_matches_int(case: tuple[torch.Tensor, int]) -> None:
    pop, num_slots = case
    assert torch.equal(replica_counts(pop.double(), num_slots), replica_counts(pop, num_slots))


def test_replica_counts_degenerate() -> None:
    assert replica_counts(torch.zeros(4), 10).tolist() == [3, 3, 2, 2]
    assert replica_counts(torch.ones(4), 10).tolist() == [3, 3, 2, 2]
    assert replica_counts(torch.full((8,), 7), 64).tolist() == [8] * 8
    assert replica_counts(torch.tensor([0, 0, 5, 0]), 10).tolist() == [1, 1, 7, 1]
    assert replica_counts(torch.tensor([3.0, 1.0, 0.0]), 3).tolist() == [1, 1, 1]
    assert replica_counts(torch.tensor([9, 0, 4, 1, 1]), 5).tolist() == [1] * 5
    # Two hot experts give up the slots the cold ones are lifted to, in turns; the
    # final tie is lost by the lowest id.
    assert replica_counts(torch.tensor([1, 1, 0, 0, 0, 0]), 7).tolist() == [1, 2, 1, 1, 1, 1]
    assert replica_counts(torch.tensor([1, 1, 0, 0, 0, 0]), 8).tolist() == [2, 2, 1, 1, 1, 1]
    assert replica_counts(torch.tensor([6, 3, 1]), 10).tolist() == [6, 3, 1]
    assert replica_counts(torch.tensor([1, 1, 1]), 4).tolist() == [2, 1, 1]  # tie -> lowest id


@pytest.mark.parametrize(
    ("pop", "num_slots", "match"),
    [
        (torch.ones(4), 3, r"num_slots \(3\) must be >= number of experts \(4\).*raise slots_per_rank"),
        (torch.ones(2, 2), 8, r"popularity must be a non-empty 1-D tensor"),
        (torch.ones(0), 8, r"popularity must be a non-empty 1-D tensor"),
        (torch.tensor([1.0, -1.0]), 8, r"non-negative"),
        (torch.tensor([1.0, float("nan")]), 8, r"NaN or inf"),
        (torch.tensor([1.0, float("inf")]), 8, r"NaN or inf"),
    ],
)
def test_replica_counts_errors(pop: torch.Tensor, num_slots: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        replica_counts(pop, num_slots)


# ---------------------------------------------------------------- load_counts


def _best_host_load(pop: list[float], n: int, f: int) -> float:
    """Exhaustive: min over all counts c >= 1 summing to f of max_e p_e / min(c_e, n)."""
    e = len(pop)
    best = math.inf
    for cuts in itertools.combinations(range(1, f), e - 1):
        c = [hi - lo for lo, hi in zip((0,) + cuts, cuts + (f,))]
        best = min(best, max(p / min(k, n) for p, k in zip(pop, c)))
    return best


@st.composite
def small_layouts(draw: st.DrawFn) -> tuple[torch.Tensor, int, int]:
    n = draw(st.integers(1, 5))
    s = draw(st.integers(1, 4))
    e = draw(st.integers(1, min(5, n * s)))
    pop = draw(st.lists(st.one_of(st.just(0), st.integers(0, 100)), min_size=e, max_size=e))
    return torch.tensor(pop, dtype=torch.int64), n, s


@FAST
@given(layouts())
def test_load_counts_properties(case: tuple[torch.Tensor, int, int]) -> None:
    pop, n, s = case
    counts = load_counts(pop, n, s)
    e = len(pop)
    assert counts.dtype == torch.int64 and counts.shape == pop.shape
    assert int(counts.sum()) == n * s and bool((counts >= 1).all())
    assert torch.equal(counts, load_counts(pop.clone(), n, s))
    assert torch.equal(counts, load_counts(pop.double(), n, s))
    if s <= e:
        assert bool((counts <= n).all())  # host counts: never a second copy on a rank
    else:
        assert bool((counts % n == 0).all()) and bool((counts >= n).all())  # whole rounds of N
    # Monotone: more popular (or as popular and a lower id) never gets fewer.
    p, c = pop.tolist(), counts.tolist()
    for i in range(e):
        for j in range(e):
            if p[i] > p[j] or (p[i] == p[j] and i < j):
                assert c[i] >= c[j], (i, j)
    # The documented bound (experts lifted to one replica aside).
    if sum(p) > 0 and n * s > e and s <= e:
        lam = max(pi / ci for pi, ci in zip(p, c))
        total, f = sum(p), n * s
        assert max(total / f, max(p) / n) <= lam * (1 + 1e-12)
        assert lam <= max(total / (f - e), max(p) / n) * (1 + 1e-12)


@FAST
@given(small_layouts())
def test_load_counts_optimal(case: tuple[torch.Tensor, int, int]) -> None:
    pop, n, s = case
    if int(pop.sum()) == 0:
        pop = torch.ones_like(pop)  # all zero counts as uniform
    counts = load_counts(pop, n, s)
    got = max(p / min(c, n) for p, c in zip(pop.tolist(), counts.tolist()))
    assert got == pytest.approx(_best_host_load(pop.double().tolist(), n, n * s), rel=1e-12)


def test_load_counts_examples() -> None:
    # A hot expert more popular than N replicas can spread gets one host per rank, not more.
    assert load_counts(torch.tensor([1000, 0, 0, 0]), 4, 2).tolist() == [4, 2, 1, 1]
    assert load_counts(torch.tensor([1000, 0, 0, 0]), 4, 2)[0] == 4
    assert replica_counts(torch.tensor([1000, 0, 0, 0]), 8).tolist() == [5, 1, 1, 1]  # the paper's: 5 > N
    # Greedy on popularity / replicas: 90/3 = 30 = 60/2, and 30 > 10 / 1.
    assert load_counts(torch.tensor([90, 60, 10]), 3, 2).tolist() == [3, 2, 1]
    assert load_counts(torch.zeros(4), 3, 2).tolist() == [2, 2, 1, 1]  # uniform; ties: lowest id
    assert load_counts(torch.zeros(4), 2, 5).tolist() == [4, 2, 2, 2]  # S > E: a whole extra round
    assert load_counts(torch.tensor([5, 1, 3]), 2, 4).tolist() == [4, 2, 2]  # S > E: whole rounds of N
    assert load_counts(torch.tensor([5, 1, 3]), 1, 3).tolist() == [1, 1, 1]
    # The paper's rule leaves expert 0 (goal 3.6 replicas) with 1, and gives expert 5 a fifth
    # copy on 4 ranks; the largest load per replica halves.
    pop = torch.tensor([50, 5, 2, 5, 2, 100, 1, 0])
    assert replica_counts(pop, 12).tolist() == [1, 1, 1, 1, 1, 5, 1, 1]
    assert load_counts(pop, 4, 3).tolist() == [2, 1, 1, 1, 1, 4, 1, 1]


@pytest.mark.parametrize(
    ("pop", "n", "s", "match"),
    [
        (torch.ones(4), 1, 3, r"num_ranks \* slots_per_rank \(1 \* 3 = 3\) must be >= number of experts \(4\)"),
        (torch.ones(4), 0, 3, r"num_ranks must be >= 1, got 0"),
        (torch.ones(4), 2, 0, r"slots_per_rank must be >= 1, got 0"),
        (torch.tensor([1.0, -1.0]), 2, 2, r"non-negative"),
        (torch.tensor([1.0, float("nan")]), 2, 2, r"NaN or inf"),
    ],
)
def test_load_counts_errors(pop: torch.Tensor, n: int, s: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_counts(pop, n, s)


# ---------------------------------------------------------------- place


def _eplb_style(popularity: torch.Tensor, counts: torch.Tensor, n: int, s: int) -> torch.Tensor:
    """Replica by replica, heaviest first, to the lightest rank with a free slot (a reference)."""
    weight = (popularity.double() / counts).tolist()
    replicas = sorted(((weight[x], x) for x, c in enumerate(counts.tolist()) for _ in range(c)), key=lambda t: (-t[0], t[1]))
    load, rows = [0.0] * n, [[] for _ in range(n)]
    for w, x in replicas:
        r = min((r for r in range(n) if len(rows[r]) < s), key=lambda r: (load[r], r))
        rows[r].append(x)
        load[r] += w
    return torch.tensor(rows)


@FAST
@given(layouts(), st.sampled_from(["load", "paper"]))
def test_place_properties(case: tuple[torch.Tensor, int, int], rule: str) -> None:
    pop, n, s = case
    counts = load_counts(pop, n, s) if rule == "load" else replica_counts(pop, n * s)
    placement = place(pop, counts, n, s)
    assert placement.dtype == torch.int64 and placement.shape == (n, s)
    assert torch.equal(torch.bincount(placement.flatten(), minlength=len(pop)), counts)
    assert torch.equal(placement, placement.sort(dim=1).values)
    assert torch.equal(placement, place(pop.clone(), counts.clone(), n, s))
    # At most ceil(counts / N) copies of an expert per rank: no avoidable duplicates.
    per_rank = torch.stack([torch.bincount(row, minlength=len(pop)) for row in placement])
    assert bool((per_rank <= -(-counts // n)).all())
    loads = rank_loads(pop, placement)
    assert loads.shape == (n,) and math.isclose(float(loads.sum()), float(pop.sum()), rel_tol=1e-9, abs_tol=1e-9)
    # The swap passes never raise the largest load.
    assert float(loads.max()) <= float(rank_loads(pop, place(pop, counts, n, s, swap_passes=0)).max()) * (1 + 1e-12)


def test_place_against_eplb_style_on_skewed_seeds() -> None:
    """The largest expected load (equal split) against replica-by-replica LPT with the same
    counts, 30 seeds per shape. With the default counts (load_counts: nearly equal replica
    weights) at most 1% worse on average and 7% in any case (measured 0.8% / 6.5%); with the
    paper's counts (unequal weights, where dealing one replica per rank and round hurts most)
    3% / 25% (measured 2.9% / 21%)."""
    for e, n, s, skew in [(16, 8, 4, 1.0), (64, 32, 4, 1.2), (32, 64, 2, 0.8), (8, 4, 3, 2.0)]:
        for rule, mean_bound, worst_bound in (("load", 1.01, 1.07), ("paper", 1.03, 1.25)):
            ratios = []
            for seed in range(30):
                pop = _zipf(e, skew, seed)
                counts = load_counts(pop, n, s) if rule == "load" else replica_counts(pop, n * s)
                ours = float(rank_loads(pop, place(pop, counts, n, s)).max())
                ratios.append(ours / float(rank_loads(pop, _eplb_style(pop, counts, n, s)).max()))
            assert sum(ratios) / len(ratios) <= mean_bound and max(ratios) < worst_bound, (e, n, s, rule, max(ratios))


def test_place_strictly_better_than_contiguous() -> None:
    pop = torch.tensor([100.0, 50.0, 20.0, 10.0, 5.0, 1.0])
    counts = replica_counts(pop, 12)
    assert counts.tolist() == [6, 2, 1, 1, 1, 1]
    assert place_contiguous(counts, 3, 4).tolist() == [[0, 0, 0, 0], [0, 0, 1, 1], [2, 3, 4, 5]]
    assert float(rank_loads(pop, place(pop, counts, 3, 4)).max()) == pytest.approx(190 / 3)
    assert float(rank_loads(pop, place_contiguous(counts, 3, 4)).max()) == pytest.approx(250 / 3)


def test_place_swaps_lower_the_maximum() -> None:
    # Rounds of LPT give {8, 7, 5} = 20 and {9, 7, 1} = 17; swapping a 7 for the 8 gives 19 / 18.
    pop = torch.tensor([9.0, 8.0, 7.0, 7.0, 5.0, 1.0])
    counts = torch.ones(6, dtype=torch.int64)
    assert sorted(rank_loads(pop, place(pop, counts, 2, 3, swap_passes=0)).tolist()) == [17.0, 20.0]
    assert sorted(rank_loads(pop, place(pop, counts, 2, 3)).tolist()) == [18.0, 19.0]


def test_place_mixes_ranks() -> None:
    """Ranks whose loads tie do not all take the same experts (the split balances through
    them): with the jitter, far more distinct rows than without."""
    pop = _zipf(64, 1.0, 0)
    counts = load_counts(pop, 256, 4)
    rows = lambda placement: torch.unique(placement, dim=0).shape[0]  # noqa: E731
    assert rows(place(pop, counts, 256, 4)) > 2 * rows(place(pop, counts, 256, 4, jitter=0.0))


@pytest.mark.parametrize(
    ("pop", "n", "s"),
    [
        (torch.zeros(6, dtype=torch.int64), 4, 3),  # all zero: as uniform
        (torch.tensor([0, 0, 50, 0, 0, 0]), 4, 3),  # one hot expert: on every rank
        (torch.tensor([5, 1, 3, 7]), 2, 2),  # N*S == E: one slot each, nothing to replicate
        (torch.tensor([5, 1, 3, 7]), 8, 1),  # S = 1
    ],
)
def test_place_degenerate_inputs(pop: torch.Tensor, n: int, s: int) -> None:
    counts = load_counts(pop, n, s)
    placement = place(pop, counts, n, s)
    assert torch.equal(torch.bincount(placement.flatten(), minlength=len(pop)), counts)
    if int(pop.sum()) and int((pop > 0).sum()) == 1:
        assert bool((placement == int(pop.argmax())).any(1).all())
    if n * s == len(pop):
        assert counts.tolist() == [1] * len(pop)


def test_place_avoids_duplicates_across_rounds() -> None:
    # Expert 1's four replicas straddle the first and second dealing rounds.
    pop = torch.tensor([30, 40, 2, 1, 1, 1, 1])
    counts = torch.tensor([2, 4, 1, 1, 1, 1, 2])
    placement = place(pop, counts, 4, 3)
    assert all(len(set(row)) == len(row) for row in placement.tolist())


def test_place_single_rank_and_one_slot() -> None:
    pop = torch.tensor([5, 1, 3])
    assert place(pop, torch.tensor([2, 1, 1]), 1, 4).tolist() == [[0, 0, 1, 2]]
    assert sorted(place(pop, torch.ones(3, dtype=torch.long), 3, 1).flatten().tolist()) == [0, 1, 2]


@pytest.mark.parametrize(
    ("pop", "counts", "n", "s", "match"),
    [
        (torch.ones(3), torch.tensor([2, 1, 1]), 2, 3, r"counts must sum to num_ranks \* slots_per_rank \(2 \* 3 = 6\), got 4"),
        (torch.ones(3), torch.tensor([3, 0, 1]), 2, 2, r"counts must be >= 1"),
        (torch.ones(2), torch.tensor([2, 1, 1]), 2, 2, r"popularity shape"),
        (torch.ones(3), torch.tensor([[2, 1, 1]]), 2, 2, r"counts must be a non-empty 1-D integer"),
        (torch.ones(3), torch.tensor([2.0, 1.0, 1.0]), 2, 2, r"counts must be a non-empty 1-D integer"),
        (torch.ones(3), torch.tensor([2, 1, 1]), 0, 2, r"num_ranks must be >= 1, got 0"),
        (torch.ones(3), torch.tensor([2, 1, 1]), 2, 0, r"slots_per_rank must be >= 1, got 0"),
    ],
)
def test_place_errors(pop: torch.Tensor, counts: torch.Tensor, n: int, s: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        place(pop, counts, n, s)


def test_place_contiguous_layout() -> None:
    assert place_contiguous(torch.tensor([3, 1, 2, 2]), 2, 4).tolist() == [[0, 0, 0, 1], [2, 2, 3, 3]]
    with pytest.raises(ValueError, match="counts must sum"):
        place_contiguous(torch.tensor([3, 1]), 2, 4)


def test_rank_loads() -> None:
    loads = rank_loads(torch.tensor([6, 4]), torch.tensor([[0, 0], [0, 1]]))
    assert loads.dtype == torch.float64 and loads.tolist() == [4.0, 6.0]


# ---------------------------------------------------------------- split


def _replica_quotas(tokens: torch.Tensor, placement: torch.Tensor) -> torch.Tensor:
    """Reference quotas of the paper's split, computed slot by slot."""
    flat = placement.flatten().tolist()
    total = tokens.sum(0).tolist()
    seen: dict[int, int] = {}
    out = []
    for ex in flat:
        k = seen.get(ex, 0)
        seen[ex] = k + 1
        c = flat.count(ex)
        out.append(total[ex] // c + (1 if k < total[ex] % c else 0))
    return torch.tensor(out)


def _rank_views(tokens: torch.Tensor, placement: torch.Tensor, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rank's view, computed separately from only what it gets: the totals, the ranks'
    pairs of their slots' experts (the all-gather), and its own pairs and those of the ranks
    below it (the scan). Returns (quota [F] common to all, send rows [N, F])."""
    n, e = tokens.shape
    totals, own, earlier = tokens.sum(0), tokens.gather(1, placement), torch.cumsum(tokens, 0) - tokens
    quotas, rows = [], []
    for r in range(n):
        layout = split_layout(placement.clone(), e)
        split = plan_split(totals.clone(), own.clone(), layout, rule)
        quotas.append(split.quota)
        rows.append(source_sends(tokens[r : r + 1], earlier[r : r + 1], torch.tensor([r]), split, layout)[0])
    assert all(torch.equal(q, quotas[0]) for q in quotas)  # every rank plans the same quotas
    return quotas[0], torch.stack(rows)


def _check_plan(plan: torch.Tensor, tokens: torch.Tensor, placement: torch.Tensor, rule: str) -> torch.Tensor:
    """What every split must satisfy (both rules); returns the quotas."""
    n, s = placement.shape
    e = tokens.shape[1]
    assert plan.dtype == torch.int64 and plan.shape == (n, n * s)
    assert bool((plan >= 0).all())
    onehot = torch.nn.functional.one_hot(placement.flatten(), e)  # [F, E]
    # Every routed pair is sent exactly once, and only to slots of its expert.
    assert torch.equal(plan @ onehot, tokens)
    # Every rank's own view gives the same: its sends are its row; what a slot receives from
    # all sources is the quota every rank planned for it.
    quota, rows = _rank_views(tokens, placement, rule)
    assert torch.equal(rows, plan) and torch.equal(plan.sum(0), quota)
    assert torch.equal(plan, split_plan(tokens.clone(), placement.clone(), rule))  # and again: deterministic
    # Local first: a rank's own slots of e absorb min(its pairs, what those slots compute).
    q = quota.view(n, s)
    for i in range(n):
        for ex in set(placement[i].tolist()):
            mask = placement[i] == ex
            assert int(plan[i].view(n, s)[i][mask].sum()) == min(int(tokens[i, ex]), int(q[i][mask].sum()))
    return quota


@FAST
@given(split_cases())
def test_replica_split_properties(case: tuple[torch.Tensor, torch.Tensor]) -> None:
    tokens, placement = case
    quota = _check_plan(split_plan(tokens, placement, "replica"), tokens, placement, "replica")
    assert torch.equal(quota, _replica_quotas(tokens, placement))


@FAST
@given(split_cases())
def test_rank_split_properties(case: tuple[torch.Tensor, torch.Tensor]) -> None:
    tokens, placement = case
    quota = _check_plan(split_plan(tokens, placement), tokens, placement, "rank").view(placement.shape)
    # Several slots of one expert on a rank are one pool: the first computes it all.
    n, s = placement.shape
    for i in range(n):
        for j in range(s):
            if placement[i, j] in placement[i, :j]:
                assert quota[i, j] == 0


def _exact_max(totals: list[int], placement: torch.Tensor) -> int:
    """The exact smallest largest rank total of any integer split (networkx max flows)."""
    import networkx as nx

    n = placement.shape[0]
    grand = sum(totals)
    if grand == 0:
        return 0
    hosts = {x: {r for r in range(n) if x in placement[r].tolist()} for x in range(len(totals)) if totals[x]}

    def feasible(level: int) -> bool:
        g = nx.DiGraph()
        for x, ranks in hosts.items():
            g.add_edge("s", ("e", x), capacity=totals[x])
            for r in ranks:
                g.add_edge(("e", x), ("r", r))
        for r in range(n):
            g.add_edge(("r", r), "t", capacity=level)
        return nx.maximum_flow_value(g, "s", "t") == grand

    lo, hi = -(-grand // n), grand
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if feasible(mid) else (mid + 1, hi)
    return lo


def _family(kind: str, e: int, g: torch.Generator) -> torch.Tensor:
    if kind == "one-hot":
        pop = torch.zeros(e, dtype=torch.float64)
        pop[int(torch.randint(e, (1,), generator=g))] = 1.0
        return pop
    if kind == "lognormal":
        return torch.exp(1.5 * torch.randn(e, generator=g, dtype=torch.float64))
    if kind == "uniform":
        return torch.ones(e, dtype=torch.float64)
    skew = float(kind.split("-")[1])
    return torch.arange(1, e + 1, dtype=torch.float64).pow(-skew)[torch.randperm(e, generator=g)]


def _pool_equal_max(totals: torch.Tensor, placement: torch.Tensor) -> float:
    """Largest rank total when every rank hosting e takes T_e / (its hosts), fractional."""
    n, e = placement.shape[0], totals.numel()
    hosts = torch.stack([(placement == x).any(1) for x in range(e)], 1).double()  # [N, E]
    return float((hosts * totals.double() / hosts.sum(0).clamp(min=1)).sum(1).max())


def test_rank_split_gap_against_exact_optimum() -> None:
    """Placements from load_counts + place on one draw of a popularity family (pairs spread
    unevenly over ranks); the split of the same draw and of the next. The realised largest rank
    total is the exact optimum or above, never above the equal split over pools (+ S for the
    integer rounding), and on average over these small, hard cases within 1% of the optimum
    (measured 0.45%, 9 of 70 cases above 0.5%, the worst 11%: zipf 2 on N = 64, S = 2);
    split_lower_bound never exceeds the optimum. On a large shape (below) the gap is < 0.5%."""
    g = torch.Generator().manual_seed(0)
    shapes = [(8, 4, 4), (16, 16, 2), (32, 16, 4), (64, 32, 4), (16, 64, 1), (12, 3, 4), (64, 64, 2)]
    gaps = []
    for kind in ("zipf-1.0", "zipf-2.0", "lognormal", "one-hot", "uniform"):
        for e, n, s in shapes:
            pop = _family(kind, e, g)
            draws = [(pop * 2000 * (0.5 + torch.rand(n, e, generator=g, dtype=torch.float64))).round().long() for _ in range(2)]
            placement = place(draws[0].sum(0), load_counts(draws[0].sum(0), n, s), n, s)
            for tokens in draws:
                totals = tokens.sum(0)
                realised = int(split_plan(tokens, placement).sum(0).view(n, s).sum(1).max())
                exact = _exact_max(totals.tolist(), placement)
                bound = int(split_lower_bound(totals, split_layout(placement, e), torch.rand(n, generator=g)))
                assert bound <= exact <= realised <= _pool_equal_max(totals, placement) + s, (kind, e, n, s)
                gaps.append(realised / max(exact, 1) - 1)
    assert sum(gaps) / len(gaps) < 0.01, sum(gaps) / len(gaps)


def test_rank_split_gap_on_a_large_placement() -> None:
    """E = 64, N = 256, S = 4, zipf 1: the next draw's split within 0.5% of the optimum."""
    e, n, s = 64, 256, 4
    draws = [_zipf(e, 1.0, 0)[None] * (0.5 + torch.rand(n, e, generator=torch.Generator().manual_seed(k), dtype=torch.float64)) / 50
             for k in range(2)]
    draws = [d.round().long() for d in draws]
    placement = place(draws[0].sum(0), load_counts(draws[0].sum(0), n, s), n, s)
    totals = draws[1].sum(0)
    realised = int(split_plan(draws[1], placement).sum(0).view(n, s).sum(1).max())
    assert realised <= _exact_max(totals.tolist(), placement) * 1.005


def test_split_lower_bound_is_exact_at_the_optimum() -> None:
    # Expert 0 only on ranks 0 and 1, with 30 pairs: they take 15 each; experts 1, 2 fill the rest.
    placement = torch.tensor([[0, 1], [0, 2], [1, 2], [1, 2]])
    totals = torch.tensor([30, 8, 8])
    layout = split_layout(placement, 3)
    assert int(split_lower_bound(totals, layout, torch.tensor([15.0, 15.0, 8.0, 8.0]))) == 15
    assert int(split_lower_bound(totals, layout, torch.tensor([11.0, 12.0, 12.0, 11.0]))) == 12  # not optimal
    quota = rank_quota(totals, layout).view(4, 2).sum(1)
    assert int(quota.max()) == _exact_max(totals.tolist(), placement) == 15


def test_rank_quota_is_exact_at_large_totals() -> None:
    """Every expert's quotas sum to its total exactly, with 2^40 pairs per expert over 16384
    slots (a scan over all of them would be off by several pairs in float64)."""
    e, n, s = 512, 4096, 4
    popularity = _zipf(e, 1.0, 0)
    placement = place(popularity, load_counts(popularity, n, s), n, s)
    totals = 2**40 - torch.randint(0, 2**20, (e,), generator=torch.Generator().manual_seed(0))
    quota = rank_quota(totals, split_layout(placement, e))
    assert bool((quota >= 0).all())
    assert torch.equal(torch.zeros(e, dtype=torch.int64).index_add_(0, placement.flatten(), quota), totals)


@pytest.mark.parametrize("rule", ["rank", "replica"])
def test_split_degenerate_inputs(rule: str) -> None:
    one_rank = split_plan(torch.tensor([[7, 0, 3]]), torch.tensor([[0, 0, 1, 2]]), rule)
    assert one_rank.sum().item() == 10 and one_rank[0, 3] == 3
    idle = split_plan(torch.tensor([[4, 0], [1, 0]]), torch.tensor([[0, 1], [0, 0]]), rule)
    assert idle[:, 1].sum() == 0 and idle.sum() == 5  # expert 1 has a slot but no pairs
    nothing = split_plan(torch.zeros(3, 2, dtype=torch.int64), torch.tensor([[0], [1], [0]]), rule)
    assert nothing.abs().sum() == 0
    # S = 1 and N*S = E: every expert on one rank, nothing to choose.
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    plan = split_plan(tokens, torch.tensor([[2], [0], [1]]), rule)
    assert plan.sum(0).tolist() == [18, 12, 15]
    # One hot expert on every rank (S = 1 and S = 2): an even split, within one pair.
    tokens = torch.tensor([[101, 0], [0, 0], [5, 0], [0, 0]])
    plan = split_plan(tokens, torch.tensor([[0], [0], [0], [0]]), rule)
    assert plan.sum(0).tolist() == [27, 27, 26, 26] if rule == "replica" else sorted(plan.sum(0).tolist()) == [26, 26, 27, 27]
    placement = torch.tensor([[0, 1], [0, 1], [0, 1], [0, 1]])
    assert int(split_plan(tokens, placement, rule).sum(0).view(4, 2).sum(1).max()) == 27


def test_rank_split_balances_where_replicas_cannot() -> None:
    # scripts/bench_layer.py's skewed case: the equal split gives 4212 / 3980 pairs; moving
    # pairs of expert 0 to rank 0 gives 4096 / 4096 with the same placement.
    placement = torch.tensor([[0, 0, 0, 2, 4, 6], [0, 0, 1, 3, 5, 7]])
    totals = torch.tensor([4096, 586, 585, 586, 585, 585, 584, 585])  # e0 half of 2 x 4096 pairs
    tokens = torch.stack([totals // 2, totals - totals // 2])
    replica = split_plan(tokens, placement, "replica").sum(0).view(2, 6).sum(1)
    rank = split_plan(tokens, placement).sum(0).view(2, 6).sum(1)
    assert replica.tolist() == [4212, 3980] and rank.tolist() == [4096, 4096]
    # Each rank keeps its own 2048 pairs of expert 0; rank 1's surplus goes to rank 0.
    plan = split_plan(tokens, placement)
    assert plan[0, 0] == 2048 and plan[1, 6] == 2048 - 294 and plan[1, 0] == 294


@pytest.mark.parametrize(
    ("tokens", "placement", "match"),
    [
        (torch.tensor([[1, 1]]), torch.tensor([[0, 0]]), r"no slot"),
        (torch.tensor([[1, -1]]), torch.tensor([[0, 1]]), r"tokens must be non-negative"),
        (torch.tensor([[1, 1]]), torch.tensor([[0, 2]]), r"expert ids outside \[0, 2\)"),
        (torch.tensor([[1, 1], [1, 1]]), torch.tensor([[0, 1]]), r"tokens must be a 2-D integer tensor \[N=1, E\]"),
        (torch.tensor([[1.0, 1.0]]), torch.tensor([[0, 1]]), r"tokens must be a 2-D integer tensor"),
        (torch.tensor([[1, 1]]), torch.tensor([0, 1]), r"placement must be a 2-D integer tensor"),
    ],
)
def test_split_plan_errors(tokens: torch.Tensor, placement: torch.Tensor, match: str) -> None:
    for rule in ("rank", "replica"):
        with pytest.raises(ValueError, match=match):
            split_plan(tokens, placement, rule)


def test_split_rule_error() -> None:
    with pytest.raises(ValueError, match=r"split rule must be one of \('rank', 'replica'\), got 'expert'"):
        split_plan(torch.tensor([[1]]), torch.tensor([[0]]), "expert")


def test_capacity_hand_example():
    # 5 tokens, top-1, 2 experts; expert 0 has 3 of the N*S = 4 slots.
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.8, 0.2], [0.3, 0.7]])
    routing_map = torch.tensor([[1, 0], [1, 0], [1, 0], [1, 0], [0, 1]], dtype=torch.bool)
    capacity = replica_capacity(5, 1, torch.tensor([3, 1]), 4, capacity_factor=1.0)
    assert capacity.tolist() == [4, 2]  # ceil(5 * 3 / 4) = 4, ceil(5 / 4) = 2
    capacity = replica_capacity(5, 1, torch.tensor([1, 1]), 2, capacity_factor=1.0)
    assert capacity.tolist() == [3, 3]  # one slot each: Megatron's ceil(T * k / E * cf)
    kept = drop_over_capacity(probs, routing_map, capacity, "probs")
    assert kept[:, 0].tolist() == [True, False, True, True, False]  # 0.6 is the lowest of four
    kept = drop_over_capacity(probs, routing_map, capacity, "position")
    assert kept[:, 0].tolist() == [True, True, True, False, False]  # the fourth token is late
    assert kept[:, 1].tolist() == [False, False, False, False, True]


@pytest.mark.parametrize("topk,capacity_factor", [(1, 1.0), (2, 1.0), (2, 0.5), (1, 1.25)])
def test_capacity_with_one_slot_per_expert_matches_megatron(topk, capacity_factor):
    # "probs" only: Megatron's "position" policy takes torch.topk over equal ints, whose choice
    # among ties is unspecified; ours keeps the earliest tokens (hand example above).
    from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping

    policy = "probs"
    generator = torch.Generator().manual_seed(topk)
    scores = torch.rand(40, 6, generator=generator)
    top = scores.topk(topk, dim=1).indices
    routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter(1, top, True)
    probs = scores * routing_map
    _, megatron_map = apply_router_token_dropping(probs, routing_map, topk, capacity_factor, policy)
    capacity = replica_capacity(40, topk, torch.ones(6, dtype=torch.long), 6, capacity_factor)
    assert torch.equal(drop_over_capacity(probs, routing_map, capacity, policy), megatron_map)
