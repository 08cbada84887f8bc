"""Token dispatcher that sends each (token, expert) pair to one replica of its expert.

Plugs into Megatron-Core's ``MoETokenDispatcher`` interface, so ``MoELayer.forward`` drives
it unchanged. Per forward pass it

1. sums the ``[2, E]`` routed-pair counts (demand, and pairs kept after any capacity drop)
   over the ranks and, in the same exchange, over the ranks below this one
   (``allreduce_exscan``: ceil(log2 N) rounds of point-to-point messages of 2E integers); the
   demand totals are the popularity the next placement is planned from;
2. gathers every rank's kept pairs of the experts of its S slots (``[N, S]``, by an all-reduce of
   a zero-padded ``[N, S]``: logarithmic latency where an all-gather's grows with N);
3. plans the split on the device, the same on every rank (``placement.plan_split``, rule
   ``SwiftMoEConfig.split``), and computes this rank's sends to every slot
   (``placement.source_sends``); receivers learn their counts from one all-to-all of the send
   counts (``[N, S]``), as Megatron's alltoall dispatcher does; the split sizes come to the
   host in one copy, the only synchronisation (the all-to-alls need host integers), with this
   rank's planned quotas: what its slots received must be exactly that, or the ranks' inputs
   disagree (an error, not a silent imbalance: any split computes every pair exactly once);
4. sends pairs to slots with one variable-size all-to-all, and results back with another.

Metadata received per rank, layer and micro-batch (int64, ``metadata_bytes``): at most
8 E ceil(log2 N) bytes for the scan (twice that with a capacity factor) + 16 N S bytes for the
all-reduce of own pairs (a ring all-reduce receives about twice its size) + 8 N S for the
all-to-all of counts: 0.44 MB at N = 4096, E = 512, S = 4 (the [N, 2, E] all-gather it replaces
received 33.6 MB).

Router probabilities never travel: they scale the expert outputs on the source rank when
results are combined, which is the same function as scaling inside the expert
(fc2 is linear). Every routed pair is computed exactly once: dropless, unless the layer's
``SwiftMoEConfig.capacity_factor`` caps each expert at a capacity proportional to its replicas.

With ``--moe-shared-expert-overlap`` the dispatcher runs the shared expert in the pieces and
at the points Megatron's all-to-all dispatcher does: its input gathered (sequence parallelism)
before the plan, fc1 and the activation once the pairs' all-to-all is issued, fc2 and the
reduce-scatter once the results' all-to-all is issued, on the shared expert's side stream, so
on GPUs it computes while the pairs travel; its output is added on combine.

Popularity is counted in training forward passes with gradients enabled only, as Megatron's
router counts its statistics: a recomputed region (``--recompute-granularity full``,
``--recompute-modules moe``) first runs without gradients, then once more with them, and
counts once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.core.tensor_parallel import all_to_all
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

from megatron_swiftmoe.core.placement import drop_over_capacity, plan_split, replica_capacity, source_sends


def allreduce_exscan(values: torch.Tensor, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum over the group, sum over the ranks below this one)`` of integer ``values`` (any
    shape), bit-identical wherever it is read.

    A butterfly: in round k every rank swaps the sum of its block of 2^k ranks with the rank
    whose index differs in bit k, and adds it to its prefix if that block lies below. With N
    not a power of two, ranks 2j + 1 < 2 (N - P) (P the largest power of two <= N) first hand
    their values to rank 2j, which answers them at the end. ceil(log2 N) + 2 rounds of
    ``values.numel()`` integers at most, point to point (torch.distributed has no scan).
    """
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    total, below = values.clone(), torch.zeros_like(values)
    if n == 1:
        return total, below
    power = 1 << (n.bit_length() - 1)
    extra = n - power

    def exchange(peer: int, send: torch.Tensor, receive: torch.Tensor | None) -> None:
        peer = dist.get_global_rank(group, peer) if group is not None else peer
        ops = [dist.P2POp(dist.isend, send, peer, group)]
        if receive is not None:
            ops.append(dist.P2POp(dist.irecv, receive, peer, group))
        for request in dist.batch_isend_irecv(ops):
            request.wait()

    def receive_from(peer: int, into: torch.Tensor) -> None:
        peer = dist.get_global_rank(group, peer) if group is not None else peer
        for request in dist.batch_isend_irecv([dist.P2POp(dist.irecv, into, peer, group)]):
            request.wait()

    if rank < 2 * extra and rank % 2:  # folded into rank - 1
        exchange(rank - 1, values.contiguous(), None)
        answer = torch.empty((2, *values.shape), dtype=values.dtype, device=values.device)
        receive_from(rank - 1, answer)
        return answer[0], answer[1]
    if rank < 2 * extra:
        partner = torch.empty_like(values)
        receive_from(rank + 1, partner)
        total += partner
    virtual = rank // 2 if rank < 2 * extra else rank - extra
    received = torch.empty_like(values)
    bit = 1
    while bit < power:
        other = virtual ^ bit
        exchange(2 * other if other < extra else other + extra, total.clone(), received)
        if other < virtual:
            below += received
        total += received
        bit <<= 1
    if rank < 2 * extra:
        exchange(rank + 1, torch.stack([total, below + values]), None)
    return total, below


def metadata_bytes(num_ranks: int, num_experts: int, slots_per_rank: int, capacity_factor: bool = False) -> int:
    """Most bytes of split metadata one rank receives per layer and micro-batch (int64): the
    scan of ``allreduce_exscan`` over [E] (or [2, E] with a capacity factor: ceil(log2 N)
    messages at most), the all-reduce of the [N, S] own pairs (twice their size, as a ring
    all-reduce receives) and the all-to-all of [N, S] send counts."""
    width = 2 * num_experts if capacity_factor else num_experts
    return 8 * (width * (num_ranks - 1).bit_length() + 3 * num_ranks * slots_per_rank)


def _inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return inverse


class SwiftMoETokenDispatcher(MoETokenDispatcher):
    """Dispatches to the replica slots of ``layer`` (a :class:`SwiftMoELayer`).

    The layer owns the placement ``[N, S]`` and the popularity counter; the dispatcher
    reads the placement and adds to the counter during training forward passes.
    """

    def __init__(self, layer, config, pg_collection) -> None:
        super().__init__(config=config, pg_collection=pg_collection)
        self.layer = layer
        self.group = layer.group
        self.num_ranks = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.slots_per_rank = layer.slots_per_rank
        self.last_routed_pairs = 0  # pairs this rank routed and kept in the last forward
        self.last_tokens_per_slot: torch.Tensor | None = None  # [S] pairs each local slot computes (host)
        self.last_dropped_per_expert: torch.Tensor | None = None  # [E] (device)
        self.last_rank_totals: torch.Tensor | None = None  # [N] pairs every rank computes (device: read when asked)
        self.last_expert_totals: torch.Tensor | None = None  # [E] kept pairs of every expert, all ranks (device)

    def dispatch_preprocess(self, tokens: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor):
        """Plan the split and gather the pairs in send order (slot-major, grouped by rank).

        tokens: ``[s, b, H]``; routing_map: bool ``[T, E]``; probs: ``[T, E]``.
        Returns ``([P, H] pair inputs, None)``.
        """
        self.hidden_shape = tokens.shape
        self._shared_experts_start(tokens)
        hidden = tokens.reshape(-1, tokens.shape[-1])
        layer, swiftmoe = self.layer, self.layer.swiftmoe
        layout, index = layer.split_layout
        demand = routing_map.sum(0).to(torch.int64)
        if swiftmoe.capacity_factor is not None:
            replicas = torch.bincount(layer.placement.flatten(), minlength=demand.numel())
            capacity = replica_capacity(
                routing_map.shape[0], self.config.moe_router_topk, replicas, layer.placement.numel(), swiftmoe.capacity_factor
            )
            routing_map = drop_over_capacity(probs, routing_map, capacity, swiftmoe.drop_policy)
            kept = routing_map.sum(0).to(torch.int64)
            totals, below = allreduce_exscan(torch.stack([demand, kept]), self.group)
            popularity, totals, below = totals[0], totals[1], below[1]
        else:  # nothing dropped: one row
            kept = demand
            totals, below = allreduce_exscan(kept, self.group)
            popularity = totals
        if layer.training and torch.is_grad_enabled():
            layer.step_popularity += popularity
        self.last_dropped_per_expert = demand - kept
        n, s = self.num_ranks, self.slots_per_rank
        # Every rank's own pairs of its slots' experts, [N, S], as an all-reduce of a zero-padded
        # [N, S] rather than an all-gather of [S]: tree all-reduces take O(log N) latency steps,
        # small all-gathers O(N) rings (about 1.4 ms vs 0.1 ms at N = 1024 in NCCL's latency model).
        own = kept.new_zeros(n, s)
        own[self.rank] = kept.index_select(0, layer.slot_experts)
        dist.all_reduce(own, group=self.group)
        plan = plan_split(totals, own, layout, swiftmoe.split)
        send = source_sends(kept[None], below[None], index[0].new_full((1,), self.rank), plan, layout, index)[0]
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)  # [N, S]: from each source to each local slot
        send, recv = send.view(n, s), recv.view(n, s)
        quota = plan.quota.view(n, s)[self.rank]
        sizes = torch.cat([send.sum(1), recv.sum(1), recv.sum(0), quota]).cpu()  # the one device-to-host copy
        self.send_splits, self.recv_splits = sizes[:n].tolist(), sizes[n : 2 * n].tolist()
        if not torch.equal(sizes[2 * n : 2 * n + s], sizes[2 * n + s :]):  # free: already on the host
            raise RuntimeError(
                f"rank {self.rank}: its slots received {sizes[2 * n : 2 * n + s].tolist()} pairs but the split "
                f"planned {sizes[2 * n + s :].tolist()}: the ranks' split inputs (totals, scans, own pairs) disagree"
            )

        # Pairs sorted by expert; each expert's pairs fill its slots in flat slot order.
        device = routing_map.device
        pair_expert, pair_token = routing_map.T.nonzero(as_tuple=True)
        slots_by_expert = layout.by_expert
        pair_slot = torch.repeat_interleave(
            slots_by_expert, send.flatten().index_select(0, slots_by_expert), output_size=sum(self.send_splits)
        )
        send_order = torch.argsort(pair_slot, stable=True)
        self.pair_token = pair_token[send_order]
        self.pair_prob = probs[pair_token, pair_expert][send_order]

        # Arrivals come source-major; experts want them slot-major.
        local_slots = torch.arange(s, device=device).repeat(n)
        arrival_slot = torch.repeat_interleave(local_slots, recv.flatten(), output_size=sum(self.recv_splits))
        self.slot_major = torch.argsort(arrival_slot, stable=True)
        self.last_routed_pairs = sum(self.send_splits)
        self.last_tokens_per_slot = sizes[2 * n : 2 * n + s]
        self.last_rank_totals = plan.quota.view(n, s).sum(1)  # realised: every slot gets its quota
        self.last_expert_totals = totals
        return hidden[self.pair_token], None

    def token_dispatch(self, hidden_states: torch.Tensor, probs):
        dispatched = all_to_all(self.group, hidden_states, self.recv_splits, self.send_splits)
        self._shared_experts_fc1(dispatched)
        return dispatched, probs

    def dispatch_postprocess(self, hidden_states: torch.Tensor, probs):
        return hidden_states[self.slot_major], self.last_tokens_per_slot, None

    def combine_preprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states[_inverse_permutation(self.slot_major)]

    def token_combine(self, hidden_states: torch.Tensor) -> torch.Tensor:
        combined = all_to_all(self.group, hidden_states, self.send_splits, self.recv_splits)
        self._shared_experts_fc2(combined)
        return combined

    def combine_postprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Scale each pair's output by its router probability and sum per token."""
        weighted = hidden_states * self.pair_prob.unsqueeze(-1).to(hidden_states.dtype)
        num_tokens = self.hidden_shape[:-1].numel()
        output = weighted.new_zeros(num_tokens, weighted.shape[-1])
        output = output.index_add(0, self.pair_token, weighted).view(self.hidden_shape)
        return self._add_shared_experts_output(output)

    # ---- --moe-shared-expert-overlap: Megatron's SharedExpertMLP pieces, in its order

    def _shared_experts_start(self, tokens: torch.Tensor) -> None:
        if self.shared_experts is not None:
            self.shared_experts.pre_forward_comm(tokens)

    def _shared_experts_fc1(self, dispatched: torch.Tensor) -> None:
        if self.shared_experts is not None:
            self.shared_experts.linear_fc1_forward_and_act(dispatched)

    def _shared_experts_fc2(self, combined: torch.Tensor) -> None:
        if self.shared_experts is not None:
            self.shared_experts.linear_fc2_forward(combined)
            self.shared_experts.post_forward_comm()

    def _add_shared_experts_output(self, output: torch.Tensor) -> torch.Tensor:
        if self.shared_experts is None:
            return output
        return output + self.shared_experts.get_output()
