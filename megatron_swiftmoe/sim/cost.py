"""The cost model: per-iteration time, its parts and the bytes moved, per strategy.

Every formula and constant is listed, with its source, in the package docstring
(``megatron_swiftmoe/sim/__init__.py``); the functions below implement them one to one.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Iterable, Optional

import torch

from megatron_swiftmoe.core import placement as placement_lib
from megatron_swiftmoe.sim.cluster import Cluster
from megatron_swiftmoe.sim.model import ModelShape
from megatron_swiftmoe.sim.overlap import Link, Transfer
from megatron_swiftmoe.sim.trace import Trace

__all__ = [
    "STRATEGIES", "PARTS", "COMM_PARTS", "METADATA_SCHEMES", "REPLACEMENT_ORDERS", "simulate", "calibrate_mfu",
    "measure_planning", "check_strategy", "replan_min_moves", "default_slots", "megatron_bucket_params",
    "ADAM_STATE_BYTES", "DEEPSPEED_MIN_CAPACITY",
]

STRATEGIES = ("static", "deepspeed", "flexmoe-10", "flexmoe-50", "flexmoe-100", "swiftmoe")
PARTS = ("expert", "a2a", "dense", "dense_sync", "expert_sync", "step", "migration", "planning")
BYTE_KINDS = ("dense_grad", "dense_param", "expert_grad", "expert_param", "tokens", "migration")
#: Background communication, each with its own exposed / hidden time.
COMM_PARTS = ("dense_grad", "dense_param", "expert_grad", "expert_param")
#: SwiftMoE re-placement: all layers' transfers issued after the step ("all") or each layer's
#: issued when the forward reaches the layer before it ("chain", one layer of look-ahead).
REPLACEMENT_ORDERS = ("all", "chain")
#: Integers (int64) a rank puts into each per-micro-batch count exchange of SwiftMoE, per MoE
#: layer, for E experts, N ranks, S slots: (all-reduced, all-gathered per rank, all-to-all per peer).
METADATA_SCHEMES = {
    # What the dispatcher does (core/dispatcher.py): the global counts and their prefix over ranks
    # ([2, E]; a butterfly of ceil(log2 N) point-to-point rounds, modelled as a tree all-reduce of
    # the same size), each rank's per-pool local counts as an all-reduce of a zero-padded [N S],
    # send counts all-to-all (1 per peer).
    "new": lambda e, n, s: (2 * e + n * s, 0, 1),
    # The per-pool counts as an all-gather instead (S each, N S in all): ring latency, O(N).
    "new-allgather": lambda e, n, s: (2 * e, s, 1),
    # Before issue 17: one all-gather of every rank's [2, E] counts ([N, 2, E] everywhere).
    "current": lambda e, n, s: (0, 2 * e, 0),
}
#: DeepSpeed-MoE's default ``min_capacity`` (deepspeed.moe.layer.MoE).
DEEPSPEED_MIN_CAPACITY = 4
#: Bytes per parameter of fp32 optimizer state in mixed precision: master copy + Adam's two
#: moments (ZeRO, Rajbhandari et al. 2020, Sec. 3.1: "K = 12"); fp32 models keep only moments.
ADAM_STATE_BYTES = {2: 12, 4: 8}


def check_strategy(name: str) -> tuple[str, int]:
    """``(kind, K)`` for a strategy name: static, deepspeed, swiftmoe, flexmoe-<K> (K: re-plan
    interval), static-ep<K> / deepspeed-ep<K> (K: the expert-parallel degree)."""
    if name in ("static", "deepspeed", "swiftmoe"):
        return name, 0
    if name.startswith("flexmoe-") and name[8:].isdigit() and int(name[8:]) >= 1:
        return "flexmoe", int(name[8:])
    for kind in ("static", "deepspeed"):
        tail = name[len(kind) + 3:]
        if name.startswith(f"{kind}-ep") and tail.isdigit() and int(tail) >= 1:
            return kind, int(tail)
    raise ValueError(f"unknown strategy {name!r}: use static, deepspeed, swiftmoe, flexmoe-<K> (K >= 1) or "
                     "static-ep<K> / deepspeed-ep<K> (expert-parallel degree K)")


@lru_cache(maxsize=None)
def measure_planning(num_ranks: int, num_experts: int, slots_per_rank: int, repeats: int = 5) -> tuple[float, float]:
    """Median seconds of CPU time, on this CPU and one thread, of SwiftMoE's default per-layer
    planning for this layout: ``(load_counts + place + split_layout, plan_split + source_sends)``
    (the split of one rank, rank rule, without its communication); the first runs once per
    iteration, the second once per micro-batch (the dispatcher's split)."""
    gen = torch.Generator().manual_seed(0)
    popularity = torch.randint(1, 1000, (num_experts,), generator=gen)
    tokens = torch.randint(0, 100, (num_ranks, num_experts), generator=gen)
    with _single_thread():
        samples = [_time_plan(popularity, tokens, num_ranks, slots_per_rank) for _ in range(repeats + 1)]
    plan, split = zip(*samples[1:])
    return statistics.median(plan), statistics.median(split)


@contextmanager
def _single_thread():
    """Tiny tensors: a second intra-op thread only adds wake-up latency (milliseconds per op
    on a loaded machine), which would inflate measured planning times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _time_plan(popularity, tokens, num_ranks: int, slots_per_rank: int) -> tuple[float, float]:
    t0 = time.thread_time()
    counts = placement_lib.load_counts(popularity, num_ranks, slots_per_rank)
    layout = placement_lib.place(popularity, counts, num_ranks, slots_per_rank)
    split = placement_lib.split_layout(layout, popularity.numel())
    rank = torch.zeros(1, dtype=torch.int64)
    index = placement_lib.source_index(split, rank)
    t1 = time.thread_time()
    plan = placement_lib.plan_split(tokens.sum(0), tokens.gather(1, layout), split, "rank")
    placement_lib.source_sends(tokens[:1], torch.zeros_like(tokens[:1]), rank, plan, split, index)
    t2 = time.thread_time()
    return t1 - t0, t2 - t1


def replan_min_moves(old: torch.Tensor, counts: torch.Tensor, popularity: torch.Tensor) -> torch.Tensor:
    """FlexMoE-style transition to new replica ``counts`` moving as few replicas as possible.

    Shrinking experts give up their replicas on the most loaded ranks first (same-rank
    duplicates first); growing experts get the freed slots, heaviest replica first, on the
    least loaded rank with a free slot, preferring ranks that do not hold the expert yet.
    Every kept replica stays where it is, so exactly ``sum(max(counts - old_counts, 0))``
    replicas are created. old: ``[N, S]``; counts: ``[E]`` summing to N*S. Returns ``[N, S]``.
    """
    n, s = old.shape
    e = counts.numel()
    slots = old.clone()
    have = torch.bincount(old.flatten(), minlength=e)
    weight = popularity.to(torch.float64) / counts.clamp(min=1)
    load = weight[slots].sum(1)
    for expert in torch.nonzero(have > counts).flatten().tolist():
        for _ in range(int(have[expert] - counts[expert])):
            held = (slots == expert).sum(1)
            # Most loaded rank among those holding it; duplicates (held > 1) go first.
            key = torch.where(held > 0, load + (held > 1) * 1e30, torch.full_like(load, -math.inf))
            rank = int(torch.argmax(key))
            slot = int(torch.nonzero(slots[rank] == expert)[0])
            slots[rank, slot] = -1
            load[rank] -= weight[expert]
    grow = torch.nonzero(counts > have).flatten()
    order = grow[torch.argsort(weight[grow], descending=True, stable=True)].tolist()
    for expert in order:
        for _ in range(int(counts[expert] - have[expert])):
            free = (slots == -1).any(1)
            holds = (slots == expert).any(1)
            key = torch.where(free, load + holds * 1e30, torch.full_like(load, math.inf))
            rank = int(torch.argmin(key))
            slot = int(torch.nonzero(slots[rank] == -1)[0])
            slots[rank, slot] = expert
            load[rank] += weight[expert]
    return slots.sort(dim=1).values



def default_slots(num_experts: int, num_ranks: int) -> int:
    """Slots per rank when none is given: the fewest that give two slots per expert on average,
    ceil(2E / N) (at least 1), so that SwiftMoE has room to replicate. More slots cost expert
    memory, expert traffic (S replicas' gradients per rank) and planning time; fewer leave no
    replica to move (N S = E holds every expert exactly once)."""
    return max(-(-2 * num_experts // num_ranks), 1)


def megatron_bucket_params(num_ranks: int) -> int:
    """Megatron DDP's default bucket size under --overlap-grad-reduce: max(40M, 1M x DP) params
    (``DistributedDataParallel.__init__``, core 0.16)."""
    return max(40_000_000, 1_000_000 * num_ranks)


@dataclass
class _Ctx:
    """Per-simulation constants: the cluster geometry, model sizes and modelling options."""

    cluster: Cluster
    model: ModelShape
    mfu: float
    planning: tuple[float, float] = (0.0, 0.0)  # seconds per layer: per iteration, per micro-batch
    static_ep: Optional[int] = None  # EP degree of static/deepspeed; None: gcd(E, N)
    overlap: bool = True  # --overlap-grad-reduce / --overlap-param-gather and SwiftMoE's overlaps
    slowdown: float = 0.0  # compute slowdown while a transfer hides behind it (fraction of its time)
    metadata: str = "new"
    replacement: str = "all"
    n: int = field(init=False)  # ranks
    node: torch.Tensor = field(init=False)  # [N] node of each rank
    micro_batches: int = field(init=False)  # M, per rank and iteration
    pairs: float = field(init=False)  # routed (token, expert) pairs per iteration and layer
    pbytes: int = field(init=False)  # w, bytes per model parameter
    opt_bytes: int = field(init=False)  # optimizer state bytes per parameter
    rate: float = field(init=False)  # achieved FLOP/s per GPU

    def __post_init__(self) -> None:
        c, m = self.cluster, self.model
        self.n = c.num_gpus
        self.node = torch.arange(self.n) // c.gpus_per_node
        self.micro_batches = m.global_batch_size // (self.n * m.micro_batch_size)
        self.pairs = float(m.tokens * m.topk)
        self.pbytes = m.param_bytes
        self.opt_bytes = ADAM_STATE_BYTES[4 if m.param_bytes >= 4 else 2]
        self.rate = c.flops(m.param_bytes) * self.mfu

    @property
    def shard(self) -> int:
        """Elements of one rank's shard of one expert (our optimizer pads to a multiple of N)."""
        return -(-self.model.expert_params // self.n)

    @property
    def micro_tokens(self) -> int:
        """Tokens of one micro-batch on one rank."""
        return self.model.micro_batch_size * self.model.seq_length

    def nodes_of(self, ranks: torch.Tensor) -> int:
        return int(torch.unique(self.node[ranks]).numel())


@dataclass
class _Layer:
    """One MoE layer in one iteration. Token all-to-all and count exchange: per micro-batch;
    expert collectives (SwiftMoE, FlexMoE): per iteration; bytes: per iteration."""

    load: torch.Tensor  # [N] pairs computed per rank in the iteration
    routed: float
    kept: float
    a2a_s: float  # one token all-to-all of one micro-batch (the busiest rank)
    a2a_link: Optional[str]  # the link class it occupies (None: nothing leaves a rank)
    meta_s: float  # the count exchange of one micro-batch
    grad_s: float = 0.0  # per-layer expert gradient collective (SwiftMoE, FlexMoE)
    grad_link: str = "inter"
    param_s: float = 0.0  # per-layer expert re-placement (SwiftMoE)
    param_link: str = "inter"
    grad_bytes: float = 0.0
    param_bytes: float = 0.0
    wire: dict = field(default_factory=dict)  # off-rank bytes sent, by kind
    fetch: Optional[torch.Tensor] = None  # [2, N] experts a rank fetches from its node / others (re-plan)
    replanned: bool = False


# ----------------------------------------------------------------------------- communication


def _flows(ctx: _Ctx, origin: torch.Tensor, held: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Off-rank pairs per rank of one all-to-all, split intra / inter node (fluid model).

    origin[r, e]: pairs rank r routes to e; held[r, e]: pairs of e rank r computes. A rank
    first serves its own pairs (split_plan's local-first rule); the rest of e flows from ranks
    with a surplus to ranks with a deficit in the same ``group``, in proportion to the deficits.
    Returns (send_intra, send_inter, recv_intra, recv_inter), each ``[N]``.
    """
    send = (origin - held).clamp(min=0)
    recv = (held - origin).clamp(min=0)
    nodes = ctx.cluster.num_nodes
    groups = int(group.max()) + 1
    cell = group * nodes + ctx.node
    e = origin.shape[1]

    def total(x: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
        return torch.zeros(size, e, dtype=x.dtype).index_add_(0, index, x)

    g_send, g_recv = total(send, group, groups)[group], total(recv, group, groups)[group]
    c_send, c_recv = total(send, cell, groups * nodes)[cell], total(recv, cell, groups * nodes)[cell]
    send_intra = (send * torch.where(g_recv > 0, c_recv / g_recv.clamp(min=1e-300), 0)).sum(1)
    recv_intra = (recv * torch.where(g_send > 0, c_send / g_send.clamp(min=1e-300), 0)).sum(1)
    return send_intra, send.sum(1) - send_intra, recv_intra, recv.sum(1) - recv_intra


def _transfer_s(ctx: _Ctx, send_intra, send_inter, recv_intra, recv_inter,
                calls: int = 1) -> tuple[float, Optional[str]]:
    """(seconds, link class) of an all-to-all-like transfer given per-rank bytes (full duplex
    links, NVLink/PCIe and NIC in parallel): ``calls`` latencies + the busiest rank's bytes / bw.
    The link class is the one that bounds it ("inter" | "intra"; None if no byte moves)."""
    intra = torch.maximum(torch.as_tensor(send_intra), torch.as_tensor(recv_intra)).double()
    inter = torch.maximum(torch.as_tensor(send_inter), torch.as_tensor(recv_inter)).double()
    if float(intra.max()) <= 0 and float(inter.max()) <= 0:
        return 0.0, None
    c = ctx.cluster
    intra_s, inter_s = float(intra.max()) / c.intra_bw, float(inter.max()) / c.inter_bw
    link = "inter" if inter_s > 0 and inter_s >= intra_s else "intra"
    return calls * c.a2a_latency(float(inter.max()) > 0) + max(intra_s, inter_s), link


def _token_a2a(ctx: _Ctx, origin, held, group) -> tuple[float, Optional[str], float]:
    """(seconds of ONE token all-to-all of one micro-batch, its link class, off-rank bytes per
    iteration of all 4 all-to-alls: dispatch and combine, forward and backward)."""
    si, sx, ri, rx = _flows(ctx, origin, held, group)
    per_pair = ctx.model.hidden_size * ctx.pbytes / ctx.micro_batches  # the iteration's flows, per micro-batch
    seconds, link = _transfer_s(ctx, si * per_pair, sx * per_pair, ri * per_pair, rx * per_pair)
    return seconds, link, 4 * float((si + sx).sum()) * per_pair * ctx.micro_batches


def _small_collective_s(ctx: _Ctx, kind: str, nbytes: float, ranks: int, nodes: int) -> float:
    """A latency-bound collective (NCCL's model, the faster protocol): ``allreduce`` of an
    ``nbytes`` message, ``allgather`` of ``nbytes`` per rank, ``alltoall`` of ``nbytes`` per peer."""
    if ranks <= 1 or nbytes <= 0:
        return 0.0
    c = ctx.cluster
    bw = c.inter_bw if nodes > 1 else c.intra_bw
    if kind == "allreduce":  # LL: a quarter of the link rate
        return c.small_allreduce_latency(ranks, nodes) + 2 * nbytes / (bw / 4)
    if kind == "allgather":  # ring only: LL or Simple, whichever is faster
        received = (ranks - 1) * nbytes
        return min(c.ring_latency(ranks, nodes, small=True) + received / (bw / 4),
                   c.ring_latency(ranks, nodes) + received / bw)
    return c.a2a_latency(nodes > 1) + (ranks - 1) * nbytes / bw


def _metadata_s(ctx: _Ctx, kind: str, group_size: int, group_nodes: int) -> float:
    """Seconds of one micro-batch's count exchange of one MoE layer. static: Megatron's alltoall
    dispatcher all-gathers each rank's [E] counts over the EP group; swiftmoe / flexmoe: the
    integers of ``METADATA_SCHEMES[ctx.metadata]`` over all N ranks. int64 counts."""
    e, s = ctx.model.num_experts, ctx.model.slots_per_rank
    if kind == "static":
        return _small_collective_s(ctx, "allgather", 8 * e, group_size, group_nodes)
    reduced, gathered, per_peer = METADATA_SCHEMES[ctx.metadata](e, group_size, s)
    return (_small_collective_s(ctx, "allreduce", 8 * reduced, group_size, group_nodes)
            + _small_collective_s(ctx, "allgather", 8 * gathered, group_size, group_nodes)
            + _small_collective_s(ctx, "alltoall", 8 * per_peer, group_size, group_nodes))


def _ring_s(ctx: _Ctx, ranks: int, nodes: int, wire_per_rank: float, allreduce: bool = False) -> float:
    """Ring collective: NCCL latency + per-rank wire bytes over the slowest link of the ring."""
    if ranks <= 1:
        return 0.0
    bw = ctx.cluster.inter_bw if nodes > 1 else ctx.cluster.intra_bw
    return ctx.cluster.ring_latency(ranks, nodes, allreduce) + wire_per_rank / bw


# ----------------------------------------------------------------------------- strategies


def _static_layout(ctx: _Ctx) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """Megatron static EP: EP = gcd(E, N) (the largest degree dividing both) unless set, expert
    data parallelism D = N / EP. Rank r hosts experts [(r % EP) * E/EP, ...); its EP group (the
    ranks its tokens go to) is r // EP. Returns (EP, D, host [N, E] bool, group [N])."""
    e, n = ctx.model.num_experts, ctx.n
    ep = ep_degree(ctx)
    r = torch.arange(n)
    host = (r % ep)[:, None] == (torch.arange(e) // (e // ep))[None, :]
    return ep, n // ep, host, r // ep


def ep_degree(ctx: _Ctx) -> int:
    """The expert-parallel degree static placement uses in this simulation."""
    return ctx.static_ep or math.gcd(ctx.model.num_experts, ctx.n)


def _static_bytes(ctx: _Ctx, ep: int, d: int) -> tuple[float, float, dict]:
    """Expert grad / param bytes of static EP with D > 1 copies per layer and iteration (ZeRO
    reduce-scatter + all-gather over the D ranks holding the same experts; the time is the
    bucketed DDP model of the timeline). Returns (grad B, param B, wire)."""
    if d <= 1:
        return 0.0, 0.0, {}
    m = ctx.model
    per_rank = m.num_experts // ep * (-(-m.expert_params // d) * d)
    grad_wire, param_wire = (d - 1) / d * per_rank * 4, (d - 1) / d * per_rank * ctx.pbytes
    wire = {"expert_grad": grad_wire * ctx.n, "expert_param": param_wire * ctx.n}
    return ctx.n * per_rank * 4.0, ctx.n * per_rank * float(ctx.pbytes), wire


def _static(ctx: _Ctx, tokens: torch.Tensor, capacity_factor: Optional[float]) -> Iterable[_Layer]:
    """static (dropless) or deepspeed (capacity factor, padded [E, C, h] buffers)."""
    ep, d, host, group = _static_layout(ctx)
    grad_b, param_b, wire_sync = _static_bytes(ctx, ep, d)
    m = ctx.model
    if capacity_factor is not None:
        per_micro = math.ceil(capacity_factor * m.topk * m.micro_batch_size * m.seq_length / m.num_experts)
        capacity = float(ctx.micro_batches * max(per_micro, DEEPSPEED_MIN_CAPACITY))
        meta_s = 0.0  # fixed-size buffers need no count exchange
    else:
        meta_s = _metadata_s(ctx, "static", ep, ctx.nodes_of(torch.arange(ep)))
    for t in tokens:
        origin = (t / ctx.n).expand(ctx.n, -1)
        if capacity_factor is None:
            kept = float(t.sum())
            held = host * (t / d)
        else:
            kept = float(origin.clamp(max=capacity).sum())
            origin = torch.full_like(origin, capacity)  # padded buffers: routing-independent
            held = host * (ep * capacity)
        a2a_s, link, tok_b = _token_a2a(ctx, origin, held, group)
        yield _Layer(held.sum(1), float(t.sum()), kept, a2a_s, link, meta_s, grad_bytes=grad_b,
                     param_bytes=param_b, wire={**wire_sync, "tokens": tok_b})


def _replica_compute(ctx: _Ctx, t: torch.Tensor, layout: torch.Tensor, capacity_factor: Optional[float]):
    """Pairs kept per expert and per-rank (origin, held) for a replica layout ``[N, S]``."""
    counts = torch.bincount(layout.flatten(), minlength=t.numel()).double()
    kept = t
    if capacity_factor is not None:
        kept = t.clamp(max=counts * capacity_factor * ctx.pairs / layout.numel())
    per_rank = torch.zeros(ctx.n, t.numel(), dtype=torch.float64)
    per_rank.scatter_add_(1, layout, torch.ones_like(layout, dtype=torch.float64))
    held = per_rank * (kept / counts)
    return kept, (kept / ctx.n).expand(ctx.n, -1), held


def _distinct(layout: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[N, E] bool: rank r holds at least one replica of e."""
    out = torch.zeros(layout.shape[0], num_experts, dtype=torch.bool)
    out.scatter_(1, layout, True)
    return out


def _swiftmoe_sync(ctx: _Ctx, now: torch.Tensor, nxt: torch.Tensor) -> dict:
    """Sparse reduce-scatter of replica grads (one all-to-all: every rank sends shard q of each
    distinct local expert to q) + scatter of updated shards to the next placement (one
    all-to-all). ``now``/``nxt``: distinct experts per rank [N]. Returns the _Layer fields."""
    g = ctx.cluster.gpus_per_node
    shard = ctx.shard

    def node_sum(u: torch.Tensor) -> torch.Tensor:  # sum of u over each rank's node
        return torch.zeros(ctx.cluster.num_nodes, dtype=u.dtype).index_add_(0, ctx.node, u)[ctx.node]

    out: dict = {"wire": {}}
    for kind, u, nbytes in (("expert_grad", now, 4), ("expert_param", nxt, ctx.pbytes)):
        u = u.double()
        b = shard * nbytes
        if kind == "expert_grad":  # rank r sends its U_r distinct experts' shards to every rank
            si, sx = u * b * (g - 1), u * b * (ctx.n - g)
            ri = b * (node_sum(u) - u)
            rx = b * (u.sum() - u) - ri
        else:  # owner r sends its shard to every rank q holding e next: U'_q shards to q
            si = b * (node_sum(u) - u)
            sx = b * (u.sum() - u) - si
            ri, rx = u * b * (g - 1), u * b * (ctx.n - g)
        seconds, link = _transfer_s(ctx, si, sx, ri, rx)
        prefix = "grad" if kind == "expert_grad" else "param"
        out[f"{prefix}_s"], out[f"{prefix}_link"] = seconds, link or "inter"
        out["wire"][kind] = float((si + sx).sum())
    padded = shard * ctx.n
    out["grad_bytes"] = float(now.sum()) * padded * 4
    out["param_bytes"] = float(nxt.sum()) * padded * ctx.pbytes
    return out


def _flexmoe_sync(ctx: _Ctx, holds: torch.Tensor) -> dict:
    """Ring all-reduce of fp32 grads among each expert's holders (FlexMoE keeps full optimizer
    state on every replica, so no parameters move). holds: [N, E]. Returns the _Layer fields."""
    p = ctx.model.expert_params * 4.0
    m = holds.sum(0)
    per_expert = torch.zeros(holds.shape[1], dtype=torch.float64)
    multi_node = False
    for e in torch.nonzero(m > 1).flatten().tolist():
        ranks = torch.nonzero(holds[:, e]).flatten()
        k, nodes = ranks.numel(), ctx.nodes_of(ranks)
        multi_node |= nodes > 1
        per_expert[e] = _ring_s(ctx, k, nodes, 2 * (k - 1) / k * p, allreduce=True)
    shared = (m > 1).double()
    seconds = float((holds.double() * per_expert).sum(1).max())
    wire = float((holds.double() * shared * 2 * (m - 1).clamp(min=0) / m.clamp(min=1) * p).sum())
    return dict(grad_s=seconds, grad_link="inter" if multi_node else "intra",
                grad_bytes=float((holds.double() * shared).sum()) * p, wire={"expert_grad": wire})


def _uniform_layout(ctx: _Ctx) -> torch.Tensor:
    return _plan(ctx, torch.ones(ctx.model.num_experts, dtype=torch.int64))


def _plan(ctx: _Ctx, popularity: torch.Tensor) -> torch.Tensor:
    """SwiftMoE's plan_placement (megatron_swiftmoe.core.layer) for N ranks x S slots: replica
    counts by the model's rule (``load``: the default, or ``paper``), then the placement policy."""
    n, s = ctx.n, ctx.model.slots_per_rank
    if ctx.model.replica_counts == "paper":
        counts = placement_lib.replica_counts(popularity, n * s)
    else:
        counts = placement_lib.load_counts(popularity, n, s)
    if ctx.model.placement_policy == "contiguous":
        return placement_lib.place_contiguous(counts, n, s)
    return placement_lib.place(popularity, counts, n, s)


def _flexmoe(ctx: _Ctx, tokens: torch.Tensor, raw: torch.Tensor, every: int,
             capacity_factor: Optional[float]) -> Iterable[_Layer]:
    layout = _uniform_layout(ctx)
    window = torch.zeros_like(raw[0])
    e = ctx.model.num_experts
    everyone = torch.zeros(ctx.n, dtype=torch.int64)
    meta_s = _metadata_s(ctx, "swiftmoe", ctx.n, ctx.cluster.num_nodes)
    for i, t in enumerate(tokens):
        fetch, replanned = None, False
        if i > 0 and i % every == 0:
            counts = placement_lib.replica_counts(window, layout.numel())
            new = replan_min_moves(layout, counts, window)
            before, after = _distinct(layout, e), _distinct(new, e)
            node_had = torch.zeros(ctx.cluster.num_nodes, e).index_add_(0, ctx.node, before.float())[ctx.node] > 0
            fetch = after & ~before  # a second local copy is a device copy, not a move
            fetch = torch.stack([(fetch & node_had).sum(1), (fetch & ~node_had).sum(1)]).double()
            layout, window, replanned = new, torch.zeros_like(window), True
        kept, origin, held = _replica_compute(ctx, t, layout, capacity_factor)
        a2a_s, link, tok_b = _token_a2a(ctx, origin, held, everyone)
        sync = _flexmoe_sync(ctx, _distinct(layout, e))
        yield _Layer(held.sum(1), float(t.sum()), float(kept.sum()), a2a_s, link, meta_s,
                     grad_s=sync["grad_s"], grad_link=sync["grad_link"], grad_bytes=sync["grad_bytes"],
                     wire={**sync["wire"], "tokens": tok_b}, fetch=fetch, replanned=replanned)
        window += raw[i]


def _swiftmoe(ctx: _Ctx, tokens: torch.Tensor, raw: torch.Tensor, capacity_factor: Optional[float]) -> Iterable[_Layer]:
    layout = _uniform_layout(ctx)
    e = ctx.model.num_experts
    everyone = torch.zeros(ctx.n, dtype=torch.int64)
    meta_s = _metadata_s(ctx, "swiftmoe", ctx.n, ctx.cluster.num_nodes)
    for i, t in enumerate(tokens):
        nxt = _plan(ctx, raw[i])  # planned from this iteration's popularity, used by the next
        kept, origin, held = _replica_compute(ctx, t, layout, capacity_factor)
        a2a_s, link, tok_b = _token_a2a(ctx, origin, held, everyone)
        sync = _swiftmoe_sync(ctx, _distinct(layout, e).sum(1), _distinct(nxt, e).sum(1))
        yield _Layer(held.sum(1), float(t.sum()), float(kept.sum()), a2a_s, link, meta_s,
                     grad_s=sync["grad_s"], grad_link=sync["grad_link"], param_s=sync["param_s"],
                     param_link=sync["param_link"], grad_bytes=sync["grad_bytes"], param_bytes=sync["param_bytes"],
                     wire={**sync["wire"], "tokens": tok_b}, replanned=True)
        layout = nxt


# ----------------------------------------------------------------------------- the iteration's timeline


@dataclass
class _Bucket:
    """A DDP bucket: parameters whose gradients are reduced together. ``first``: the earliest
    forward position among its chunks: its gradients are complete when the backward finishes
    that position, and the forward needs its parameters when it reaches that position."""

    params: float
    first: int


def _buckets(chunks: list[float], limit: Optional[int]) -> list[_Bucket]:
    """Megatron's bucketing: chunks (parameters per forward position) taken in backward order
    (last position first) into buckets closed when they reach ``limit`` params (None: one bucket)."""
    out, size, first = [], 0.0, None
    for pos in range(len(chunks) - 1, -1, -1):
        if chunks[pos] <= 0:
            continue
        size, first = size + chunks[pos], pos
        if limit is not None and size >= limit:
            out.append(_Bucket(size, first))
            size, first = 0.0, None
    if first is not None:
        out.append(_Bucket(size, first))
    return out


@dataclass
class _Fixed:
    """Strategy-level constants of the timeline (positions: 0 embedding, 1..L layers, L+1 output)."""

    dense_fwd: list[float]  # forward compute seconds of one micro-batch per position, excluding routed experts
    dense_buckets: list[_Bucket]
    dense_grad_s: list[float]  # per bucket
    dense_param_s: list[float]
    dense_link: str
    expert_buckets: list[_Bucket] = field(default_factory=list)  # static D > 1 (positions of MoE layers)
    expert_grad_s: list[float] = field(default_factory=list)
    expert_param_s: list[float] = field(default_factory=list)
    expert_link: str = "inter"


def _fixed(ctx: _Ctx, kind: str) -> _Fixed:
    m, n = ctx.model, ctx.n
    h, nl = m.hidden_size, m.num_layers
    tokens = ctx.micro_tokens
    dense_fwd = [0.0] + [tokens * m.layer_dense_flops_per_token(j) / ctx.rate for j in range(nl)]
    dense_fwd.append(tokens * 2.0 * m.vocab_size * h / ctx.rate)
    embedding = (0 if m.tied_embeddings else m.vocab_size * h) + m.position_embeddings * h
    output = m.norm_params * h + (0 if m.tied_embeddings else m.vocab_size * h)
    if m.tied_embeddings:  # one weight: its gradient is complete only after the embedding's backward
        embedding += m.vocab_size * h
    chunks = [float(embedding)] + [float(m.layer_dense_params(j)) for j in range(nl)] + [float(output)]
    limit = megatron_bucket_params(n) if ctx.overlap else None
    buckets = _buckets(chunks, limit)
    nodes = ctx.cluster.num_nodes

    def rs_ag(params: float, ranks: int, group_nodes: int) -> tuple[float, float]:
        padded = -(-params // ranks) * ranks
        wire = (ranks - 1) / ranks * padded
        return (_ring_s(ctx, ranks, group_nodes, wire * 4), _ring_s(ctx, ranks, group_nodes, wire * ctx.pbytes))

    times = [rs_ag(b.params, n, nodes) for b in buckets]
    fixed = _Fixed(dense_fwd, buckets, [t[0] for t in times], [t[1] for t in times],
                   "inter" if nodes > 1 else "intra")
    if kind in ("static", "deepspeed"):
        ep, d, _, _ = _static_layout(ctx)
        if d > 1:
            per_layer = m.num_experts // ep * m.expert_params
            echunks = [0.0] + [float(per_layer * m.moe_layers[j]) for j in range(nl)] + [0.0]
            fixed.expert_buckets = _buckets(echunks, limit)
            group_nodes = ctx.nodes_of(torch.arange(0, n, ep))
            etimes = [rs_ag(b.params, d, group_nodes) for b in fixed.expert_buckets]
            fixed.expert_grad_s, fixed.expert_param_s = [t[0] for t in etimes], [t[1] for t in etimes]
            fixed.expert_link = "inter" if group_nodes > 1 else "intra"
    return fixed


def _need(position: int, sub: int = 0) -> float:
    """Service order of transfers: the forward position that needs them (dense before experts)."""
    return position + 0.5 * sub


def _timeline(ctx: _Ctx, kind: str, fixed: _Fixed, layers: list[Optional[_Layer]]) -> dict:
    """Exposed and hidden seconds of one iteration's background communication and planning.

    ``layers[j]``: the MoE record of model layer j (None for dense layers). The gradient side
    runs the LAST micro-batch's backward (gradients are reduced only on the last, Megatron's
    ``no_sync``); the parameter side runs the FIRST micro-batch's forward of the next iteration
    (charged to this one: steady state). With overlap off every transfer is exposed and
    Megatron uses one bucket (``bucket_size`` None)."""
    m = ctx.model
    nl = m.num_layers
    out = {f"{p}_{x}": 0.0 for p in COMM_PARTS for x in ("total", "exposed", "hidden")}

    def expert_fwd(j: int) -> float:
        rec = layers[j]
        return 2.0 * float(rec.load.max()) / ctx.micro_batches * m.expert_params / ctx.rate

    # ---- gradients: the last micro-batch's backward
    dense_grads = [Transfer("dense_grad", s, fixed.dense_link, -b.first) for b, s in
                   zip(fixed.dense_buckets, fixed.dense_grad_s)]
    static_grads = [Transfer("expert_grad", s, fixed.expert_link, -b.first - 0.5) for b, s in
                    zip(fixed.expert_buckets, fixed.expert_grad_s)]
    layer_grads = {j: Transfer("expert_grad", rec.grad_s, rec.grad_link, -(j + 1) - 0.5)
                   for j, rec in enumerate(layers) if rec is not None and rec.grad_s > 0}
    grads = dense_grads + static_grads + list(layer_grads.values())

    # ---- parameters: the first micro-batch's forward of the next iteration
    dense_params = [Transfer("dense_param", s, fixed.dense_link, _need(b.first)) for b, s in
                    zip(fixed.dense_buckets, fixed.dense_param_s)]
    static_params = [Transfer("expert_param", s, fixed.expert_link, _need(b.first, 1)) for b, s in
                     zip(fixed.expert_buckets, fixed.expert_param_s)]
    layer_params = {j: Transfer("expert_param", rec.param_s, rec.param_link, _need(j + 1, 1))
                    for j, rec in enumerate(layers) if rec is not None and rec.param_s > 0}
    params = dense_params + static_params + list(layer_params.values())

    backward = 0.0  # the last micro-batch's backward (the planning window), with overlap
    if not ctx.overlap:
        for t in grads + params:
            t.done = t.exposed = t.seconds
    else:
        link = Link()

        def release_at(position: int) -> None:
            link.release(t for t, b in zip(dense_grads, fixed.dense_buckets) if b.first == position)
            link.release(t for t, b in zip(static_grads, fixed.expert_buckets) if b.first == position)

        link.run(2 * fixed.dense_fwd[nl + 1])
        release_at(nl + 1)
        for j in range(nl - 1, -1, -1):
            rec = layers[j]
            if rec is not None:
                link.run(rec.a2a_s, rec.a2a_link)  # combine, backward
                link.run(2 * expert_fwd(j))
                if j in layer_grads:
                    link.release([layer_grads[j]])
                link.run(rec.a2a_s, rec.a2a_link)  # dispatch, backward
            link.run(2 * fixed.dense_fwd[j + 1])
            release_at(j + 1)
        link.run(2 * fixed.dense_fwd[0])
        release_at(0)
        backward = link.now
        link.wait(grads)  # finish_grad_sync before the optimizer step

        # Forward: Megatron's param all-gather is a chain (each bucket's pre-hook waits for it,
        # then starts the next); static's expert buckets likewise; SwiftMoE's layers per
        # ctx.replacement.
        link = Link()
        dense_chain = sorted(zip(fixed.dense_buckets, dense_params), key=lambda x: x[0].first)
        static_chain = sorted(zip(fixed.expert_buckets, static_params), key=lambda x: x[0].first)
        swift_chain = sorted(layer_params.items())
        for chain in (dense_chain, static_chain):
            if chain:
                link.release([chain[0][1]])
        if ctx.replacement == "all":
            link.release(t for _, t in swift_chain)
        elif swift_chain:
            link.release([swift_chain[0][1]])

        def hook(position: int) -> None:
            """Forward pre-hooks at ``position``: wait for its transfers, start the next ones."""
            for chain in (dense_chain, static_chain):
                for k, (bucket, t) in enumerate(chain):
                    if bucket.first == position:
                        link.wait([t])
                        if k + 1 < len(chain):
                            link.release([chain[k + 1][1]])
            layer = position - 1
            if layer in layer_params:
                link.wait([layer_params[layer]])
                if ctx.replacement == "chain":
                    later = [t for j, t in swift_chain if j > layer]
                    if later:
                        link.release(later[:1])

        hook(0)
        link.run(fixed.dense_fwd[0])
        for j in range(nl):
            hook(j + 1)
            rec = layers[j]
            link.run(fixed.dense_fwd[j + 1])
            if rec is not None:
                link.run(rec.meta_s)
                if kind == "swiftmoe":
                    link.run(ctx.planning[1])
                link.run(rec.a2a_s, rec.a2a_link)
                link.run(expert_fwd(j))
                link.run(rec.a2a_s, rec.a2a_link)
        hook(nl + 1)

    for t in grads + params:
        out[f"{t.part}_total"] += t.seconds
        out[f"{t.part}_exposed"] += t.exposed + ctx.slowdown * t.hidden
        out[f"{t.part}_hidden"] += t.hidden
    out["backward_s"] = backward
    return out


# ----------------------------------------------------------------------------- per iteration


def _dense_bytes(ctx: _Ctx) -> dict:
    """Bytes of the ZeRO-1 sync of dense params (per iteration, strategy-independent)."""
    n = ctx.n
    padded = -(-ctx.model.dense_params // n) * n
    wire = (n - 1) / n * padded
    return dict(grad=float(n * padded * 4), param=float(n * padded * ctx.pbytes),
                wire_grad=n * wire * 4, wire_param=n * wire * ctx.pbytes, padded=padded)


def _expert_state(ctx: _Ctx, kind: str) -> tuple[float, float]:
    """(expert params whose optimizer state a rank owns, expert state bytes per rank) per layer."""
    m, p = ctx.model, ctx.model.expert_params
    weights = ctx.pbytes + 4  # model-dtype weights + fp32 gradient buffer
    if kind in ("static", "deepspeed"):
        ep, d, _, _ = _static_layout(ctx)
        per = m.num_experts // ep
        return per * p / d, per * p * weights + per * p / d * ctx.opt_bytes
    if kind == "swiftmoe":
        owned = m.num_experts * ctx.shard
        return owned, m.slots_per_rank * p * weights + owned * ctx.opt_bytes
    return m.slots_per_rank * p, m.slots_per_rank * p * (weights + ctx.opt_bytes)  # flexmoe: full state per replica


def _moe_trace_layers(trace: Trace, model: ModelShape) -> list[Optional[int]]:
    """For every model layer: the trace layer its MoE layer replays (MoE layer i of L_moe uses
    trace layer i * L_trace // L_moe), None for dense layers."""
    out, i = [], 0
    for is_moe in model.moe_layers:
        out.append(i * trace.num_layers // model.num_moe_layers if is_moe else None)
        i += is_moe
    return out


def _validate(trace: Trace, cluster: Cluster, model: ModelShape) -> None:
    if trace.num_experts != model.num_experts:
        raise ValueError(
            f"the trace has {trace.num_experts} experts per layer but model {model.name} has {model.num_experts}: "
            f"the model must have the trace's expert count (the command line takes it from the trace: omit "
            f"--num-experts, or pass --num-experts {trace.num_experts})")
    n, mb = cluster.num_gpus, model.micro_batch_size
    if model.global_batch_size % (n * mb):
        step = n * mb
        fix = max(step, round(model.global_batch_size / step) * step)
        raise ValueError(
            f"global batch size {model.global_batch_size} must be a multiple of {n} GPUs x micro-batch {mb} "
            f"= {step}: pass --global-batch-size {fix} (or another multiple of {step}), or --micro-batch-size")
    if n * model.slots_per_rank < model.num_experts:
        raise ValueError(
            f"{n} GPUs x {model.slots_per_rank} slots per rank < {model.num_experts} experts: SwiftMoE needs "
            f"--slots-per-rank >= {-(-model.num_experts // n)}")


def simulate(
    trace: Trace,
    cluster: Cluster,
    model: ModelShape,
    strategies: Iterable[str] = STRATEGIES,
    *,
    mfu: float = 0.4,
    capacity_factor: float = 1.0,
    swiftmoe_capacity_factor: Optional[float] = None,
    planning_s: Optional[float] = None,
    static_ep: Optional[int] = None,
    overlap: bool = True,
    overlap_slowdown: float = 0.0,
    metadata: str = "new",
    replacement: str = "all",
) -> dict:
    """Model every strategy's iteration time on ``cluster`` for ``model`` and ``trace``'s routing.

    Args:
        mfu: achieved fraction of the cluster's peak FLOP/s in compute.
        capacity_factor: DeepSpeed's and FlexMoE's capacity factor (the paper ran 1.0); None: dropless.
        swiftmoe_capacity_factor: None (dropless, our default) or a capacity factor for SwiftMoE.
        planning_s: SwiftMoE planning seconds per MoE layer and iteration; None: measure the
            default path (``measure_planning``) on this CPU for the modelled N, E, S.
        static_ep: expert-parallel degree of static / deepspeed (must divide E and N); None:
            gcd(E, N). ``E / S`` gives static placement the same S experts per rank as SwiftMoE's
            slots (D = N S / E copies of each expert, synchronised every iteration): the
            equal-memory layout the paper's byte identity compares with.
        overlap: Megatron's --overlap-grad-reduce / --overlap-param-gather for dense (and static
            expert-data-parallel) parameters, SwiftMoE's per-layer expert-gradient reduction and
            re-placement and its planning during backward; False: everything after backward.
        overlap_slowdown: extra compute time per second of communication hidden behind it.
        metadata: SwiftMoE's per-micro-batch count exchange, a key of ``METADATA_SCHEMES``.
        replacement: ``all`` (every layer's re-placement issued after the step, one at a time in
            layer order) or ``chain`` (one layer of look-ahead, like Megatron's param gather).

    Returns a JSON-serialisable dict: ``cluster``, ``model``, ``trace``, ``settings``, ``notes``
    and ``strategies``: per strategy ``time_ms`` (mean per iteration), ``parts_ms`` (exposed
    time of each part; they sum to ``time_ms``), ``hidden_ms`` (time hidden behind compute),
    ``comm_ms`` (per COMM_PARTS kind: total, exposed, hidden), ``bytes`` (per iteration, the
    paper's accounting) and ``wire_bytes`` (off-rank bytes sent), ``load_imbalance`` (max / mean
    rank load, mean over layers and iterations), ``survival``, ``replans``, ``replan_slowdown``,
    ``memory_gb`` (per rank, weights + grads + optimizer state), ``per_iteration``
    (``time_ms``, ``migration_ms``, ``expert_grad_bytes``, ``expert_param_bytes``,
    ``migration_bytes``: one entry per trace iteration) and ``speedup_vs_static`` /
    ``speedup_vs_deepspeed`` (static's / deepspeed's time over this one).
    """
    with _single_thread():
        return _simulate(trace, cluster, model, list(strategies), mfu, capacity_factor,
                         swiftmoe_capacity_factor, planning_s, static_ep, overlap, overlap_slowdown,
                         metadata, replacement)


def _run_strategy(ctx: _Ctx, kind: str, every: int, raw: torch.Tensor, scaled: torch.Tensor,
                  trace_layers: list[Optional[int]], dense: dict, capacity_factor: Optional[float],
                  swiftmoe_capacity_factor: Optional[float]) -> dict:
    """One strategy over the whole trace: per iteration, the model layers replay their trace
    layers; compute, all-to-all and the timeline of the background work give the parts."""
    model, cluster, iters = ctx.model, ctx.cluster, raw.shape[0]
    records: dict[int, list[_Layer]] = {}
    for j in sorted({t for t in trace_layers if t is not None}):
        tokens = scaled[:, j]
        if kind == "static":
            steps = _static(ctx, tokens, None)
        elif kind == "deepspeed":
            steps = _static(ctx, tokens, capacity_factor)
        elif kind == "flexmoe":
            steps = _flexmoe(ctx, tokens, raw[:, j], every, capacity_factor)
        else:
            steps = _swiftmoe(ctx, tokens, raw[:, j], swiftmoe_capacity_factor)
        records[j] = list(steps)
    fixed = _fixed(ctx, kind)
    mb, lm = ctx.micro_batches, model.num_moe_layers
    parts = torch.zeros(iters, len(PARTS), dtype=torch.float64)
    hidden = torch.zeros(iters, 3, dtype=torch.float64)  # dense_sync, expert_sync, planning
    comm = torch.zeros(iters, len(COMM_PARTS), 3, dtype=torch.float64)  # total, exposed, hidden
    nbytes = torch.zeros(iters, len(BYTE_KINDS), dtype=torch.float64)
    wire = torch.zeros(iters, len(BYTE_KINDS), dtype=torch.float64)
    imbalance = routed = kept = 0.0
    owned, state = _expert_state(ctx, kind)
    step_bytes = 16 + 12 + (ctx.pbytes if ctx.pbytes < 4 else 0)
    step_s = (dense["padded"] / ctx.n + lm * owned) * step_bytes / (cluster.hbm_gb_s * 1e9)
    dense_s = mb * 3 * sum(fixed.dense_fwd)
    peak_fetch, replanned = 0.0, [False] * iters
    for i in range(iters):
        layers = [None if t is None else records[t][i] for t in trace_layers]
        moe = [rec for rec in layers if rec is not None]
        fetch = torch.zeros(2, ctx.n, dtype=torch.float64)
        for rec in moe:
            mx, mean = float(rec.load.max()), float(rec.load.mean())
            parts[i, PARTS.index("expert")] += 6 * mx * model.expert_params / ctx.rate
            parts[i, PARTS.index("a2a")] += mb * (4 * rec.a2a_s + rec.meta_s)
            nbytes[i, BYTE_KINDS.index("expert_grad")] += rec.grad_bytes
            nbytes[i, BYTE_KINDS.index("expert_param")] += rec.param_bytes
            for key, value in rec.wire.items():
                wire[i, BYTE_KINDS.index(key)] += value
            imbalance += mx / mean if mean else 1.0
            routed += rec.routed
            kept += rec.kept
            replanned[i] |= rec.replanned
            if rec.fetch is not None:  # weights + optimizer state of every fetched expert
                fetch += rec.fetch * model.expert_params * (ctx.pbytes + ctx.opt_bytes)
        timeline = _timeline(ctx, kind, fixed, layers)
        for k, p in enumerate(COMM_PARTS):
            comm[i, k] = torch.tensor([timeline[f"{p}_{x}"] for x in ("total", "exposed", "hidden")])
        parts[i, PARTS.index("dense")] = dense_s
        parts[i, PARTS.index("dense_sync")] = timeline["dense_grad_exposed"] + timeline["dense_param_exposed"]
        parts[i, PARTS.index("expert_sync")] = timeline["expert_grad_exposed"] + timeline["expert_param_exposed"]
        hidden[i, 0] = timeline["dense_grad_hidden"] + timeline["dense_param_hidden"]
        hidden[i, 1] = timeline["expert_grad_hidden"] + timeline["expert_param_hidden"]
        parts[i, PARTS.index("step")] = step_s
        if float(fetch.sum()) > 0:
            # Moves fetch from a holder in the same node if any, else over the network.
            intra, inter = fetch
            parts[i, PARTS.index("migration")] = _transfer_s(ctx, intra * 0, inter * 0, intra, inter)[0]
            nbytes[i, BYTE_KINDS.index("migration")] = wire[i, BYTE_KINDS.index("migration")] = float(fetch.sum())
            peak_fetch = max(peak_fetch, float((intra + inter).max()))
        plan, split = ctx.planning
        if kind == "swiftmoe":
            # The next placement is planned on the host as soon as the popularity is final: during
            # the last micro-batch's backward (overlap on); the split of every micro-batch is on
            # the critical path (between the count exchange and the token all-to-all).
            total_plan = lm * plan
            exposed_plan = max(0.0, total_plan - timeline["backward_s"]) if ctx.overlap else total_plan
            parts[i, PARTS.index("planning")] = exposed_plan + mb * lm * split
            hidden[i, 2] = total_plan - exposed_plan
        elif kind == "flexmoe" and replanned[i]:
            parts[i, PARTS.index("planning")] = lm * plan
    tokens_col = BYTE_KINDS.index("tokens")
    nbytes[:, tokens_col] = wire[:, tokens_col]
    nbytes[:, BYTE_KINDS.index("dense_grad")] = dense["grad"]
    nbytes[:, BYTE_KINDS.index("dense_param")] = dense["param"]
    wire[:, BYTE_KINDS.index("dense_grad")] = dense["wire_grad"]
    wire[:, BYTE_KINDS.index("dense_param")] = dense["wire_param"]
    totals = parts.sum(1) * 1e3
    replans = [i for i in range(iters) if replanned[i]] if kind != "swiftmoe" else []
    others = [i for i in range(iters) if i not in replans]
    memory = model.dense_params * (ctx.pbytes + 4) + dense["padded"] / ctx.n * ctx.opt_bytes + lm * state
    return dict(
        time_ms=float(totals.mean()),
        parts_ms={p: float(parts[:, k].mean()) * 1e3 for k, p in enumerate(PARTS)},
        hidden_ms={p: float(hidden[:, k].mean()) * 1e3 for k, p in enumerate(("dense_sync", "expert_sync", "planning"))},
        comm_ms={p: {x: float(comm[:, k, c].mean()) * 1e3 for c, x in enumerate(("total", "exposed", "hidden"))}
                 for k, p in enumerate(COMM_PARTS)},
        bytes={b: float(nbytes[:, k].mean()) for k, b in enumerate(BYTE_KINDS)},
        wire_bytes={b: float(wire[:, k].mean()) for k, b in enumerate(BYTE_KINDS)},
        load_imbalance=imbalance / (iters * lm),
        survival=kept / routed if routed else 1.0,
        replans=iters if kind == "swiftmoe" else len(replans),
        replan_slowdown=(float(totals[replans].mean() / totals[others].mean()) if replans and others else None),
        memory_gb=(memory + peak_fetch) / 1e9,
        migration_peak_gb=peak_fetch / 1e9,
        per_iteration=dict(
            time_ms=totals.tolist(),
            migration_ms=(parts[:, PARTS.index("migration")] * 1e3).tolist(),
            **{f"{b}_bytes": nbytes[:, BYTE_KINDS.index(b)].tolist()
               for b in ("expert_grad", "expert_param", "migration")},
        ),
    )


def _simulate(trace: Trace, cluster: Cluster, model: ModelShape, strategies: list[str], mfu: float,
              capacity_factor: Optional[float], swiftmoe_capacity_factor: Optional[float],
              planning_s: Optional[float], static_ep: Optional[int] = None, overlap: bool = True,
              overlap_slowdown: float = 0.0, metadata: str = "new", replacement: str = "all") -> dict:
    kinds = {name: check_strategy(name) for name in strategies}
    _validate(trace, cluster, model)
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    eps = [(f"--static-ep ({static_ep})", static_ep)] + [
        (f"strategy {name}", k) for name, (kind, k) in kinds.items() if kind in ("static", "deepspeed") and k]
    for what, ep in eps:
        if ep is not None and (ep < 1 or model.num_experts % ep or cluster.num_gpus % ep):
            raise ValueError(f"{what} must divide the number of experts ({model.num_experts}) "
                             f"and of GPUs ({cluster.num_gpus})")
    if metadata not in METADATA_SCHEMES:
        raise ValueError(f"unknown metadata scheme {metadata!r}: use one of {', '.join(METADATA_SCHEMES)}")
    if replacement not in REPLACEMENT_ORDERS:
        raise ValueError(f"unknown re-placement order {replacement!r}: use one of {', '.join(REPLACEMENT_ORDERS)}")
    if not overlap_slowdown >= 0:
        raise ValueError(f"overlap slowdown must be >= 0, got {overlap_slowdown}")
    ctx = _Ctx(cluster, model, mfu, static_ep=static_ep, overlap=overlap, slowdown=overlap_slowdown,
               metadata=metadata, replacement=replacement)
    if planning_s is None:
        ctx.planning = measure_planning(ctx.n, model.num_experts, model.slots_per_rank)
    else:
        ctx.planning = (float(planning_s), 0.0)
    dense = _dense_bytes(ctx)
    trace_layers = _moe_trace_layers(trace, model)
    raw = trace.tokens
    total = raw.sum(-1, keepdim=True).double()
    shares = torch.where(total > 0, raw.double() / total.clamp(min=1), 1.0 / model.num_experts)
    scaled = shares * ctx.pairs  # [I, Lt, E] pairs per iteration at the modelled batch
    iters = trace.num_iterations
    notes = []
    if trace.num_layers != model.num_moe_layers:
        notes.append(f"trace has {trace.num_layers} MoE layers, model {model.num_moe_layers}: model MoE layer l "
                     f"replays trace layer l*{trace.num_layers}//{model.num_moe_layers}")
    if trace.num_ranks and trace.num_ranks != cluster.num_gpus:
        notes.append(f"trace recorded on {trace.num_ranks} ranks, replayed on {cluster.num_gpus}: expert "
                     "popularity shares are kept, placements re-planned")

    def context(kind: str, k: int) -> _Ctx:  # static-ep<K>: the same run with EP = K
        return dataclasses.replace(ctx, static_ep=k) if kind in ("static", "deepspeed") and k else ctx

    results = {
        name: _run_strategy(context(*kinds[name]), *kinds[name], raw, scaled, trace_layers, dense, capacity_factor,
                            swiftmoe_capacity_factor)
        for name in strategies
    }
    for name, (kind, k) in kinds.items():
        if kind in ("static", "deepspeed"):
            results[name]["static_ep"] = k or ep_degree(ctx)
    for name, res in results.items():
        for base in ("static", "deepspeed"):
            res[f"speedup_vs_{base}"] = results[base]["time_ms"] / res["time_ms"] if base in results else None
    return dict(
        cluster=asdict(cluster),
        model={**asdict(model), "expert_params": model.expert_params, "dense_params": model.dense_params},
        trace=dict(path=trace.path, iterations=iters, layers=trace.num_layers, experts=trace.num_experts,
                   recorded_ranks=trace.num_ranks, recorded_strategy=trace.strategy),
        settings=dict(mfu=mfu, capacity_factor=capacity_factor, swiftmoe_capacity_factor=swiftmoe_capacity_factor,
                      static_ep=ep_degree(ctx), static_expert_copies=ctx.n // ep_degree(ctx),
                      planning_s_per_layer=ctx.planning[0], rank_plan_s_per_layer_microbatch=ctx.planning[1],
                      planning_measured=planning_s is None, micro_batches_per_rank=ctx.micro_batches,
                      overlap=overlap, overlap_slowdown=overlap_slowdown, metadata=metadata,
                      replacement=replacement, bucket_params=megatron_bucket_params(ctx.n) if overlap else None,
                      metadata_ms_per_layer_microbatch={
                          "static": _metadata_s(ctx, "static", ep_degree(ctx),
                                                ctx.nodes_of(torch.arange(ep_degree(ctx)))) * 1e3,
                          "swiftmoe": _metadata_s(ctx, "swiftmoe", ctx.n, cluster.num_nodes) * 1e3}),
        notes=notes,
        strategies=results,
    )


def calibrate_mfu(trace: Trace, cluster: Cluster, model: ModelShape, **kwargs) -> float:
    """The MFU that makes the modelled time of the recorded strategy equal the trace's mean
    measured ``iter_time_s``. Only meaningful for a trace recorded on ``cluster`` with ``model``.
    Modelled time falls as the MFU rises (overlap windows shrink with it, so the relation is not
    linear): solved by bisection."""
    times = [t for t in trace.iter_time_s if t is not None]
    if not times or trace.strategy is None:
        raise ValueError(f"{trace.path}: no measured iter_time_s / recording layout to calibrate from")
    if trace.num_ranks != cluster.num_gpus:
        raise ValueError(f"calibration needs the trace's own cluster: recorded on {trace.num_ranks} ranks, "
                         f"cluster {cluster.name} has {cluster.num_gpus} GPUs")
    measured = statistics.mean(times) * 1e3

    def modelled(mfu: float) -> float:
        return simulate(trace, cluster, model, [trace.strategy], mfu=mfu, **kwargs)["strategies"][trace.strategy]["time_ms"]

    fastest = modelled(1.0)
    if measured <= fastest:
        raise ValueError(f"measured {measured:.1f} ms per iteration is below the modelled {fastest:.1f} ms at "
                         "MFU 1: the cluster description does not fit this trace")
    lo, hi = 1e-6, 1.0
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if modelled(mid) < measured else (mid, hi)
    return math.sqrt(lo * hi)
