"""Token dispatcher that sends each (token, expert) pair to one replica of its expert.

Plugs into Megatron-Core's ``MoETokenDispatcher`` interface, so ``MoELayer.forward`` drives
it unchanged. Per forward pass it

1. all-gathers the ``[2, E]`` routed-pair counts (demand and kept pairs) of every rank, a
   few hundred bytes: their column sums are the expert popularity the next placement is
   planned from, and the ``[N, E]`` kept pairs are the input of the split plan;
2. copies them to the host once (the only synchronisation the plan needs) and computes the
   deterministic split plan there (``placement.rank_plan_with_totals``, ``SwiftMoEConfig.split``):
   by default the split that minimises the largest rank total, then keeps the most pairs on
   their source rank; the split sizes of the all-to-alls come out as host integers;
3. sends pairs to slots with one variable-size all-to-all, and results back with another.

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

from megatron_swiftmoe.core.placement import drop_over_capacity, rank_plan_with_totals, repeat, replica_capacity


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
        self.last_dropped_per_expert: torch.Tensor | None = None
        self.last_rank_totals: torch.Tensor | None = None  # [N] pairs every rank computes (host)
        self.last_expert_totals: torch.Tensor | None = None  # [E] kept pairs of every expert, all ranks (host)

    def dispatch_preprocess(self, tokens: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor):
        """Plan the split and gather the pairs in send order (slot-major, grouped by rank).

        tokens: ``[s, b, H]``; routing_map: bool ``[T, E]``; probs: ``[T, E]``.
        Returns ``([P, H] pair inputs, None)``.
        """
        self.hidden_shape = tokens.shape
        self._shared_experts_start(tokens)
        hidden = tokens.reshape(-1, tokens.shape[-1])
        placement = self.layer.placement
        demand = routing_map.sum(0).to(torch.int64)
        swiftmoe = self.layer.swiftmoe
        if swiftmoe.capacity_factor is not None:
            replicas = torch.bincount(placement.flatten(), minlength=demand.numel())
            capacity = replica_capacity(
                routing_map.shape[0], self.config.moe_router_topk, replicas, placement.numel(), swiftmoe.capacity_factor
            )
            routing_map = drop_over_capacity(probs, routing_map, capacity, swiftmoe.drop_policy)
        kept = routing_map.sum(0).to(torch.int64)
        # One all-gather of [2, E] per rank: demand (popularity, before any drop) and kept pairs.
        gathered = demand.new_empty(self.num_ranks * 2 * demand.numel())
        dist.all_gather_into_tensor(gathered, torch.cat([demand, kept]), group=self.group)
        gathered = gathered.view(self.num_ranks, 2, -1)
        if self.layer.training and torch.is_grad_enabled():
            self.layer.step_popularity += gathered[:, 0].sum(0)
        self.last_dropped_per_expert = demand - kept
        counts = gathered[:, 1].cpu()

        plan = rank_plan_with_totals(counts, self.layer.host_placement, self.rank, swiftmoe.split)
        send, recv = plan.send, plan.recv  # [N*S], [S, N], host
        self.send_splits = send.view(self.num_ranks, -1).sum(1).tolist()
        self.recv_splits = recv.sum(0).tolist()

        # Pairs sorted by expert; each expert's pairs fill its slots in flat slot order.
        device = routing_map.device
        pair_expert, pair_token = routing_map.T.nonzero(as_tuple=True)
        slots_by_expert = torch.argsort(self.layer.host_placement.flatten(), stable=True)
        # Host-to-device copies are non-blocking: a blocking one would wait for the stream.
        pair_slot = repeat(
            slots_by_expert.to(device, non_blocking=True),
            send[slots_by_expert].to(device, non_blocking=True),
            sum(self.send_splits),
        )
        send_order = torch.argsort(pair_slot, stable=True)
        self.pair_token = pair_token[send_order]
        self.pair_prob = probs[pair_token, pair_expert][send_order]

        # Arrivals come source-major; experts want them slot-major.
        local_slots = torch.arange(self.slots_per_rank, device=device).repeat(self.num_ranks)
        arrival_slot = repeat(local_slots, recv.T.flatten().to(device, non_blocking=True), sum(self.recv_splits))
        self.slot_major = torch.argsort(arrival_slot, stable=True)
        self.last_routed_pairs = sum(self.send_splits)
        self.last_tokens_per_slot = recv.sum(1)
        self.last_rank_totals = plan.totals
        self.last_expert_totals = counts.sum(0)
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
