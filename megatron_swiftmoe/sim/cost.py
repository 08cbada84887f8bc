"""The cost model: per-iteration time, its parts and the bytes moved, per strategy.

Every formula and constant is listed, with its source, in the package docstring
(``megatron_swiftmoe/sim/__init__.py``); the functions below implement them one to one.
"""

from __future__ import annotations

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
from megatron_swiftmoe.sim.trace import Trace

__all__ = [
    "STRATEGIES", "PARTS", "simulate", "calibrate_mfu", "measure_planning", "check_strategy",
    "replan_min_moves", "ADAM_STATE_BYTES", "DEEPSPEED_MIN_CAPACITY",
]

STRATEGIES = ("static", "deepspeed", "flexmoe-10", "flexmoe-50", "flexmoe-100", "swiftmoe")
PARTS = ("expert", "a2a", "dense", "dense_sync", "expert_sync", "step", "migration", "planning")
BYTE_KINDS = ("dense_grad", "dense_param", "expert_grad", "expert_param", "tokens", "migration")
#: DeepSpeed-MoE's default ``min_capacity`` (deepspeed.moe.layer.MoE).
DEEPSPEED_MIN_CAPACITY = 4
#: Bytes per parameter of fp32 optimizer state in mixed precision: master copy + Adam's two
#: moments (ZeRO, Rajbhandari et al. 2020, Sec. 3.1: "K = 12"); fp32 models keep only moments.
ADAM_STATE_BYTES = {2: 12, 4: 8}


def check_strategy(name: str) -> tuple[str, int]:
    """``(kind, K)`` for a strategy name: static, deepspeed, swiftmoe, flexmoe-<K>."""
    if name in ("static", "deepspeed", "swiftmoe"):
        return name, 0
    if name.startswith("flexmoe-") and name[8:].isdigit() and int(name[8:]) >= 1:
        return "flexmoe", int(name[8:])
    raise ValueError(f"unknown strategy {name!r}: use static, deepspeed, swiftmoe or flexmoe-<K> (K >= 1)")


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


@dataclass
class _Ctx:
    """Per-simulation constants: the cluster geometry and model sizes in the model's units."""

    cluster: Cluster
    model: ModelShape
    mfu: float
    planning: tuple[float, float] = (0.0, 0.0)  # seconds per layer: per iteration, per micro-batch
    static_ep: Optional[int] = None  # EP degree of static/deepspeed; None: gcd(E, N)
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

    def nodes_of(self, ranks: torch.Tensor) -> int:
        return int(torch.unique(self.node[ranks]).numel())


@dataclass
class _Layer:
    """One MoE layer in one iteration (all quantities for the whole iteration)."""

    load: torch.Tensor  # [N] pairs computed per rank
    routed: float
    kept: float
    a2a_s: float
    sync_s: float
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


def _transfer_s(ctx: _Ctx, send_intra, send_inter, recv_intra, recv_inter, calls: int = 1) -> float:
    """Seconds for an all-to-all-like transfer given per-rank bytes (full duplex links,
    NVLink/PCIe and NIC in parallel): ``calls`` latencies + the busiest rank's bytes / bw."""
    intra = torch.maximum(torch.as_tensor(send_intra), torch.as_tensor(recv_intra)).double()
    inter = torch.maximum(torch.as_tensor(send_inter), torch.as_tensor(recv_inter)).double()
    if float(intra.max()) <= 0 and float(inter.max()) <= 0:
        return 0.0
    c = ctx.cluster
    busy = max(float(intra.max()) / c.intra_bw, float(inter.max()) / c.inter_bw)
    return calls * c.a2a_latency(float(inter.max()) > 0) + busy


def _token_a2a(ctx: _Ctx, origin, held, group, metadata_group: Optional[torch.Tensor]) -> tuple[float, float]:
    """(seconds, off-rank bytes) of one layer's 4 token all-to-alls per micro-batch (dispatch and
    combine, forward and backward), plus the per-micro-batch count exchange over ``metadata_group``."""
    si, sx, ri, rx = _flows(ctx, origin, held, group)
    per_pair = ctx.model.hidden_size * ctx.pbytes
    seconds = 4 * _transfer_s(ctx, si * per_pair, sx * per_pair, ri * per_pair, rx * per_pair, ctx.micro_batches)
    if metadata_group is not None and metadata_group.numel() > 1:
        seconds += ctx.micro_batches * ctx.cluster.ring_latency(
            metadata_group.numel(), ctx.nodes_of(metadata_group), small=True)
    return seconds, 4 * float((si + sx).sum()) * per_pair


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


def _static_sync(ctx: _Ctx, ep: int, d: int) -> tuple[float, float, float, dict]:
    """Expert grads / params of static EP with D > 1 copies: ZeRO reduce-scatter + all-gather
    over the D ranks holding the same experts (strided by EP). Returns (s, grad B, param B, wire)."""
    if d <= 1:
        return 0.0, 0.0, 0.0, {}
    m = ctx.model
    padded = -(-m.expert_params // d) * d
    per_rank = m.num_experts // ep * padded
    nodes = ctx.nodes_of(torch.arange(0, ctx.n, ep))
    grad_wire, param_wire = (d - 1) / d * per_rank * 4, (d - 1) / d * per_rank * ctx.pbytes
    seconds = _ring_s(ctx, d, nodes, grad_wire) + _ring_s(ctx, d, nodes, param_wire)
    wire = {"expert_grad": grad_wire * ctx.n, "expert_param": param_wire * ctx.n}
    return seconds, ctx.n * per_rank * 4.0, ctx.n * per_rank * float(ctx.pbytes), wire


def _static(ctx: _Ctx, tokens: torch.Tensor, capacity_factor: Optional[float]) -> Iterable[_Layer]:
    """static (dropless) or deepspeed (capacity factor, padded [E, C, h] buffers)."""
    ep, d, host, group = _static_layout(ctx)
    sync_s, grad_b, param_b, wire_sync = _static_sync(ctx, ep, d)
    m = ctx.model
    if capacity_factor is not None:
        per_micro = math.ceil(capacity_factor * m.topk * m.micro_batch_size * m.seq_length / m.num_experts)
        capacity = float(ctx.micro_batches * max(per_micro, DEEPSPEED_MIN_CAPACITY))
    for t in tokens:
        origin = (t / ctx.n).expand(ctx.n, -1)
        if capacity_factor is None:
            kept = float(t.sum())
            held = host * (t / d)
            meta = torch.arange(ep)  # Megatron's alltoall dispatcher gathers counts over EP
        else:
            kept = float(origin.clamp(max=capacity).sum())
            origin = torch.full_like(origin, capacity)  # padded buffers: routing-independent
            held = host * (ep * capacity)
            meta = None  # fixed-size buffers need no count exchange
        a2a_s, tok_b = _token_a2a(ctx, origin, held, group, meta)
        yield _Layer(held.sum(1), float(t.sum()), kept, a2a_s, sync_s, grad_b, param_b,
                     {**wire_sync, "tokens": tok_b})


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


def _swiftmoe_sync(ctx: _Ctx, now: torch.Tensor, nxt: torch.Tensor) -> tuple[float, float, float, dict]:
    """Sparse reduce-scatter of replica grads (one all-to-all: every rank sends shard q of each
    distinct local expert to q) + scatter of updated shards to the next placement (one
    all-to-all). ``now``/``nxt``: distinct experts per rank [N]. Returns (s, grad B, param B, wire)."""
    n, g = ctx.n, ctx.cluster.gpus_per_node
    shard = ctx.shard

    def node_sum(u: torch.Tensor) -> torch.Tensor:  # sum of u over each rank's node
        return torch.zeros(ctx.cluster.num_nodes, dtype=u.dtype).index_add_(0, ctx.node, u)[ctx.node]

    seconds, wire = 0.0, {}
    for kind, u, nbytes in (("expert_grad", now, 4), ("expert_param", nxt, ctx.pbytes)):
        u = u.double()
        b = shard * nbytes
        if kind == "expert_grad":  # rank r sends its U_r distinct experts' shards to every rank
            si, sx = u * b * (g - 1), u * b * (n - g)
            ri = b * (node_sum(u) - u)
            rx = b * (u.sum() - u) - ri
        else:  # owner r sends its shard to every rank q holding e next: U'_q shards to q
            si = b * (node_sum(u) - u)
            sx = b * (u.sum() - u) - si
            ri, rx = u * b * (g - 1), u * b * (n - g)
        seconds += _transfer_s(ctx, si, sx, ri, rx)
        wire[kind] = float((si + sx).sum())
    padded = shard * n
    return seconds, float(now.sum()) * padded * 4, float(nxt.sum()) * padded * ctx.pbytes, wire


def _flexmoe_sync(ctx: _Ctx, holds: torch.Tensor) -> tuple[float, float, dict]:
    """Ring all-reduce of fp32 grads among each expert's holders (FlexMoE keeps full optimizer
    state on every replica, so no parameters move). holds: [N, E]. Returns (s, grad B, wire)."""
    p = ctx.model.expert_params * 4.0
    m = holds.sum(0)
    per_expert = torch.zeros(holds.shape[1], dtype=torch.float64)
    for e in torch.nonzero(m > 1).flatten().tolist():
        ranks = torch.nonzero(holds[:, e]).flatten()
        k = ranks.numel()
        per_expert[e] = _ring_s(ctx, k, ctx.nodes_of(ranks), 2 * (k - 1) / k * p, allreduce=True)
    shared = (m > 1).double()
    seconds = float((holds.double() * per_expert).sum(1).max())
    wire = float((holds.double() * shared * 2 * (m - 1).clamp(min=0) / m.clamp(min=1) * p).sum())
    return seconds, float((holds.double() * shared).sum()) * p, {"expert_grad": wire}


def _uniform_layout(ctx: _Ctx) -> torch.Tensor:
    return _plan(ctx, torch.ones(ctx.model.num_experts, dtype=torch.int64))


def _plan(ctx: _Ctx, popularity: torch.Tensor) -> torch.Tensor:
    """SwiftMoE's plan_placement (megatron_swiftmoe.core.layer) for N ranks x S slots."""
    n, s = ctx.n, ctx.model.slots_per_rank
    counts = placement_lib.replica_counts(popularity, n * s)
    if ctx.model.placement_policy == "contiguous":
        return placement_lib.place_contiguous(counts, n, s)
    return placement_lib.place(popularity, counts, n, s)


def _flexmoe(ctx: _Ctx, tokens: torch.Tensor, raw: torch.Tensor, every: int,
             capacity_factor: Optional[float]) -> Iterable[_Layer]:
    layout = _uniform_layout(ctx)
    window = torch.zeros_like(raw[0])
    e = ctx.model.num_experts
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
        a2a_s, tok_b = _token_a2a(ctx, origin, held, torch.zeros(ctx.n, dtype=torch.int64), torch.arange(ctx.n))
        sync_s, grad_b, wire = _flexmoe_sync(ctx, _distinct(layout, e))
        yield _Layer(held.sum(1), float(t.sum()), float(kept.sum()), a2a_s, sync_s, grad_b, 0.0,
                     {**wire, "tokens": tok_b}, fetch, replanned)
        window += raw[i]


def _swiftmoe(ctx: _Ctx, tokens: torch.Tensor, raw: torch.Tensor, capacity_factor: Optional[float]) -> Iterable[_Layer]:
    layout = _uniform_layout(ctx)
    e = ctx.model.num_experts
    for i, t in enumerate(tokens):
        nxt = _plan(ctx, raw[i])  # planned from this iteration's popularity, used by the next
        kept, origin, held = _replica_compute(ctx, t, layout, capacity_factor)
        a2a_s, tok_b = _token_a2a(ctx, origin, held, torch.zeros(ctx.n, dtype=torch.int64), torch.arange(ctx.n))
        sync_s, grad_b, param_b, wire = _swiftmoe_sync(ctx, _distinct(layout, e).sum(1), _distinct(nxt, e).sum(1))
        yield _Layer(held.sum(1), float(t.sum()), float(kept.sum()), a2a_s, sync_s, grad_b, param_b,
                     {**wire, "tokens": tok_b}, replanned=True)
        layout = nxt


# ----------------------------------------------------------------------------- per iteration


def _dense(ctx: _Ctx) -> dict:
    """Strategy-independent per-iteration terms: dense compute, ZeRO-1 sync of dense params."""
    m, n = ctx.model, ctx.n
    padded = -(-m.dense_params // n) * n
    dense_s = m.tokens / n * m.dense_flops_per_token / ctx.rate
    wire = (n - 1) / n * padded
    nodes = ctx.cluster.num_nodes
    sync_s = _ring_s(ctx, n, nodes, wire * 4) + _ring_s(ctx, n, nodes, wire * ctx.pbytes)
    return dict(dense_s=dense_s, sync_s=sync_s, grad=float(n * padded * 4), param=float(n * padded * ctx.pbytes),
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


def _layer_map(trace: Trace, model: ModelShape) -> dict[int, int]:
    """Trace layer -> number of model MoE layers replaying it (model layer l uses l * Lt // Lm)."""
    lt, lm = trace.num_layers, model.num_moe_layers
    out: dict[int, int] = {}
    for layer in range(lm):
        j = layer * lt // lm
        out[j] = out.get(j, 0) + 1
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
) -> dict:
    """Model every strategy's iteration time on ``cluster`` for ``model`` and ``trace``'s routing.

    Args:
        mfu: achieved fraction of the cluster's peak FLOP/s in compute.
        capacity_factor: DeepSpeed's and FlexMoE's capacity factor (the paper ran 1.0); None: dropless.
        swiftmoe_capacity_factor: None (dropless, our default) or a capacity factor for SwiftMoE.
        planning_s: SwiftMoE planning seconds per MoE layer and iteration; None: measure
            ``replica_counts + place`` and ``rank_plan`` on this CPU for the cluster's layout.
        static_ep: expert-parallel degree of static / deepspeed (must divide E and N); None:
            gcd(E, N). ``E / S`` gives static placement the same S experts per rank as SwiftMoE's
            slots (D = N S / E copies of each expert, synchronised every iteration): the
            equal-memory layout the paper's byte identity compares with.

    Returns a JSON-serialisable dict: ``cluster``, ``model``, ``trace``, ``settings``, ``notes``
    and ``strategies``: per strategy ``time_ms`` (mean per iteration), ``parts_ms``, ``bytes``
    (per iteration, the paper's accounting) and ``wire_bytes`` (off-rank bytes sent),
    ``load_imbalance`` (max / mean rank load, mean over layers and iterations), ``survival``,
    ``replans``, ``replan_slowdown``, ``memory_gb`` (per rank, weights + grads + optimizer
    state), ``per_iteration`` (``time_ms``, ``migration_ms``, ``expert_grad_bytes``,
    ``expert_param_bytes``, ``migration_bytes``: one entry per trace iteration) and
    ``speedup_vs_static`` / ``speedup_vs_deepspeed`` (static's / deepspeed's time over this one).
    """
    with _single_thread():
        return _simulate(trace, cluster, model, list(strategies), mfu, capacity_factor,
                         swiftmoe_capacity_factor, planning_s, static_ep)


def _run_strategy(ctx: _Ctx, kind: str, every: int, raw: torch.Tensor, scaled: torch.Tensor,
                  layer_map: dict[int, int], dense: dict, capacity_factor: Optional[float],
                  swiftmoe_capacity_factor: Optional[float]) -> dict:
    """One strategy over the whole trace: sums the layers (each trace layer counted for the
    model layers replaying it), adds the per-iteration terms and summarises."""
    model, cluster, iters = ctx.model, ctx.cluster, raw.shape[0]
    parts = torch.zeros(iters, len(PARTS), dtype=torch.float64)
    nbytes = torch.zeros(iters, len(BYTE_KINDS), dtype=torch.float64)
    wire = torch.zeros(iters, len(BYTE_KINDS), dtype=torch.float64)
    fetch_bytes = [torch.zeros(2, ctx.n, dtype=torch.float64) for _ in range(iters)]  # intra, inter
    replanned = [False] * iters
    imbalance = routed = kept = 0.0
    for j, mult in layer_map.items():
        tokens = scaled[:, j]
        if kind == "static":
            steps = _static(ctx, tokens, None)
        elif kind == "deepspeed":
            steps = _static(ctx, tokens, capacity_factor)
        elif kind == "flexmoe":
            steps = _flexmoe(ctx, tokens, raw[:, j], every, capacity_factor)
        else:
            steps = _swiftmoe(ctx, tokens, raw[:, j], swiftmoe_capacity_factor)
        for i, step in enumerate(steps):
            mx, mean = float(step.load.max()), float(step.load.mean())
            parts[i, PARTS.index("expert")] += mult * 6 * mx * model.expert_params / ctx.rate
            parts[i, PARTS.index("a2a")] += mult * step.a2a_s
            parts[i, PARTS.index("expert_sync")] += mult * step.sync_s
            nbytes[i, BYTE_KINDS.index("expert_grad")] += mult * step.grad_bytes
            nbytes[i, BYTE_KINDS.index("expert_param")] += mult * step.param_bytes
            for key, value in step.wire.items():
                wire[i, BYTE_KINDS.index(key)] += mult * value
            imbalance += mult * (mx / mean if mean else 1.0)
            routed += mult * step.routed
            kept += mult * step.kept
            replanned[i] |= step.replanned
            if step.fetch is not None:  # weights + optimizer state of every fetched expert
                fetch_bytes[i] += mult * step.fetch * model.expert_params * (ctx.pbytes + ctx.opt_bytes)
    nbytes[:, BYTE_KINDS.index("tokens")] = wire[:, BYTE_KINDS.index("tokens")]
    owned, state = _expert_state(ctx, kind)
    lm = model.num_moe_layers
    step_bytes = 16 + 12 + (ctx.pbytes if ctx.pbytes < 4 else 0)
    step_s = (dense["padded"] / ctx.n + lm * owned) * step_bytes / (cluster.hbm_gb_s * 1e9)
    peak_fetch = 0.0
    for i in range(iters):
        parts[i, PARTS.index("dense")] = dense["dense_s"]
        parts[i, PARTS.index("dense_sync")] = dense["sync_s"]
        parts[i, PARTS.index("step")] = step_s
        intra, inter = fetch_bytes[i]
        if float(fetch_bytes[i].sum()) > 0:
            # Moves fetch from a holder in the same node if any, else over the network.
            parts[i, PARTS.index("migration")] = _transfer_s(ctx, intra * 0, inter * 0, intra, inter)
            nbytes[i, BYTE_KINDS.index("migration")] = wire[i, BYTE_KINDS.index("migration")] = float(
                fetch_bytes[i].sum())
            peak_fetch = max(peak_fetch, float((intra + inter).max()))
        if kind == "swiftmoe":
            plan, split = ctx.planning
            parts[i, PARTS.index("planning")] = lm * (plan + ctx.micro_batches * split)
        elif kind == "flexmoe" and replanned[i]:
            parts[i, PARTS.index("planning")] = lm * ctx.planning[0]
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
              planning_s: Optional[float], static_ep: Optional[int] = None) -> dict:
    kinds = {name: check_strategy(name) for name in strategies}
    _validate(trace, cluster, model)
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    if static_ep is not None and (static_ep < 1 or model.num_experts % static_ep or cluster.num_gpus % static_ep):
        raise ValueError(f"--static-ep ({static_ep}) must divide the number of experts ({model.num_experts}) "
                         f"and of GPUs ({cluster.num_gpus})")
    ctx = _Ctx(cluster, model, mfu, static_ep=static_ep)
    if planning_s is None:
        plan, split = measure_planning(ctx.n, model.num_experts, model.slots_per_rank)
        ctx.planning = (plan, split)
    else:
        ctx.planning = (float(planning_s), 0.0)
    dense = _dense(ctx)
    layer_map = _layer_map(trace, model)
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

    results = {
        name: _run_strategy(ctx, *kinds[name], raw, scaled, layer_map, dense, capacity_factor,
                            swiftmoe_capacity_factor)
        for name in strategies
    }
    for name, res in results.items():
        for base in ("static", "deepspeed"):
            res[f"speedup_vs_{base}"] = results[base]["time_ms"] / res["time_ms"] if base in results else None
    return dict(
        cluster=asdict(cluster),
        model={**asdict(model), "expert_params": model.expert_params, "dense_params": model.dense_params},
        trace=dict(path=trace.path, iterations=iters, layers=trace.num_layers, experts=trace.num_experts,
                   recorded_ranks=trace.num_ranks, recorded_strategy=trace.strategy),
        settings=dict(mfu=mfu, capacity_factor=capacity_factor, swiftmoe_capacity_factor=swiftmoe_capacity_factor,
                      static_ep=ep_degree(ctx),
                      planning_s_per_layer=ctx.planning[0], rank_plan_s_per_layer_microbatch=ctx.planning[1],
                      planning_measured=planning_s is None, micro_batches_per_rank=ctx.micro_batches),
        notes=notes,
        strategies=results,
    )


def calibrate_mfu(trace: Trace, cluster: Cluster, model: ModelShape, **kwargs) -> float:
    """The MFU that makes the modelled time of the recorded strategy equal the trace's mean
    measured ``iter_time_s``. Only meaningful for a trace recorded on ``cluster`` with ``model``:
    modelled time = compute(mfu=1) / mfu + the rest, solved for mfu."""
    times = [t for t in trace.iter_time_s if t is not None]
    if not times or trace.strategy is None:
        raise ValueError(f"{trace.path}: no measured iter_time_s / recording layout to calibrate from")
    if trace.num_ranks != cluster.num_gpus:
        raise ValueError(f"calibration needs the trace's own cluster: recorded on {trace.num_ranks} ranks, "
                         f"cluster {cluster.name} has {cluster.num_gpus} GPUs")
    res = simulate(trace, cluster, model, [trace.strategy], mfu=1.0, **kwargs)["strategies"][trace.strategy]
    compute = res["parts_ms"]["expert"] + res["parts_ms"]["dense"]
    rest = res["time_ms"] - compute
    measured = statistics.mean(times) * 1e3
    if measured <= rest:
        raise ValueError(f"measured {measured:.1f} ms per iteration is below the modelled non-compute time "
                         f"{rest:.1f} ms: the cluster description does not fit this trace")
    return compute / (measured - rest)
