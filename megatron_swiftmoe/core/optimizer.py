"""Distributed optimizer for models with SwiftMoE layers: static shards, moving replicas.

* Dense (non-expert) parameters: ZeRO-1 over the data-parallel group. Gradients are
  reduce-scattered, AdamW updates fp32 master shards, parameters are all-gathered.
* Experts of Megatron's stock ``MoELayer`` under static expert parallelism (the baseline,
  tagged ``allreduce=False`` by Megatron) live on one rank only and are updated there.
* Expert parameters: for every layer and expert, the fp32 master weights and Adam moments
  are split into N equal shards and rank r owns shard r of every expert for the whole run.
  After backward, the gradients of all replicas of an expert reach the shard owners summed
  (replicas on one rank are summed locally first, then one all-to-all delivers every shard to
  its owner: a sparse reduce-scatter). After the step each owner sends its updated shard of
  expert e to every rank that holds e in the *next* placement (one all-to-all). That is the
  only transfer of expert parameters; optimizer state never moves.

With pipeline parallelism every stage's optimizer does the above over that stage's data-parallel
group, and the gradient norm for clipping sums over all stages, counting every parameter once:
the last stage's copy of a tied embedding (``shared``, Megatron's ``param_is_not_shared`` rule)
is left out.

AdamW itself is ``torch.optim.AdamW`` running on the master shards, so the update is the same
elementwise math as a single-process ``AdamW`` over the unreplicated model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.transformer.module import param_is_not_shared
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_updated_expert_bias

from megatron_swiftmoe.core.layer import SwiftMoELayer, master_dtype, plan_placement, shard_numel, swiftmoe_layers
from megatron_swiftmoe.core.overlap import ExpertTraffic, expert_comm_groups


def _padded(numel: int, num_ranks: int) -> int:
    return shard_numel(numel, num_ranks) * num_ranks


def attach_main_grad(param: torch.nn.Parameter) -> None:
    """Accumulate micro-batch gradients of low-precision params in fp32 (``param.main_grad``)."""
    param.main_grad = None

    def accumulate(p: torch.nn.Parameter) -> None:
        grad = p.grad.to(master_dtype(p.dtype))
        p.main_grad = grad if p.main_grad is None else p.main_grad.add_(grad)
        p.grad = None

    param.register_post_accumulate_grad_hook(accumulate)


def param_grad(param: torch.nn.Parameter) -> Optional[torch.Tensor]:
    """The accumulated gradient of ``param``: its fp32 ``main_grad`` if it has one, else ``grad``."""
    return param.main_grad if hasattr(param, "main_grad") else param.grad


class NonFiniteGradients(RuntimeError):
    """Gradients with a NaN or Inf, found before the optimizer step (nothing was stepped).

    Raised on every rank at once, with the same message (:func:`describe_nonfinite_grads`):
    the gradient norm that finds them is reduced over all ranks.
    """

    def at_iteration(self, iteration: int) -> str:
        """The message for the user, with the iteration the run stopped at."""
        return (
            f"non-finite gradients at iteration {iteration}, found before the optimizer step: {self}. Nothing of "
            "this iteration was stepped or saved; the last checkpoint is from before it. Find the cause (learning "
            "rate, this iteration's data, a faulty device) before resuming"
        )


class DynamicLossScaler:
    """fp16 loss scaling: halve on overflow, double after ``growth_interval`` clean steps."""

    def __init__(self, initial_scale: float = 2.0**16, growth_interval: int = 1000, min_scale: float = 1.0):
        self.scale = float(initial_scale)
        self.growth_interval = growth_interval
        self.min_scale = min_scale
        self._clean_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self._clean_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self._clean_steps = float(state["scale"]), int(state["clean_steps"])

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.scale = max(self.scale / 2.0, self.min_scale)
            self._clean_steps = 0
            return
        self._clean_steps += 1
        if self._clean_steps >= self.growth_interval:
            self.scale *= 2.0
            self._clean_steps = 0


class _DenseShard:
    """ZeRO-1 shard of a list of dense parameters flattened into one padded vector."""

    def __init__(self, params: list[torch.nn.Parameter], group: dist.ProcessGroup):
        self.params = params
        self.group = group
        num_ranks = dist.get_world_size(group)
        numel = sum(p.numel() for p in params)
        self.padded = _padded(numel, num_ranks)
        self.shard_numel = self.padded // num_ranks
        start = dist.get_rank(group) * self.shard_numel
        self.dtype = master_dtype(params[0].dtype)
        flat = self._flatten([p.detach() for p in params], self.dtype)
        self.master = flat[start : start + self.shard_numel].clone().requires_grad_()

    def _flatten(self, tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        flat = torch.zeros(self.padded, dtype=dtype, device=self.params[0].device)
        offset = 0
        for tensor in tensors:
            flat[offset : offset + tensor.numel()] = tensor.reshape(-1)
            offset += tensor.numel()
        return flat

    def _flat_grads(self) -> torch.Tensor:
        return self._flatten([param_grad(p) if param_grad(p) is not None else torch.zeros_like(p) for p in self.params], self.dtype)

    def _write_params(self, flat: torch.Tensor) -> None:
        offset = 0
        for param in self.params:
            param.copy_(flat[offset : offset + param.numel()].view_as(param))
            offset += param.numel()

    def reduce_scatter_grads(self, num_ranks: int) -> int:
        """Sum gradients over ranks into ``master.grad`` (averaged). Returns bytes sent."""
        flat = self._flat_grads()
        shard = flat.new_empty(self.shard_numel)
        dist.reduce_scatter_tensor(shard, flat, group=self.group)
        self.master.grad = shard.div_(num_ranks)
        return flat.numel() * flat.element_size()

    @torch.no_grad()
    def all_gather_params(self) -> int:
        """Write the updated master shards into the model parameters. Returns bytes sent."""
        shard = self.master.detach().to(self.params[0].dtype)
        full = shard.new_empty(self.padded)
        dist.all_gather_into_tensor(full, shard, group=self.group)
        self._write_params(full)
        return shard.numel() * shard.element_size()


class _LocalParams(_DenseShard):
    """Parameters only this rank holds (Megatron's static expert parallelism, ``allreduce=False``).

    Their gradients already contain every rank's tokens (the all-to-all's backward brought
    them), so nothing is reduced: the master copy is whole and updated locally.
    """

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.group = None
        self.padded = self.shard_numel = sum(p.numel() for p in params)
        self.dtype = master_dtype(params[0].dtype)
        self.master = self._flatten([p.detach() for p in params], self.dtype).requires_grad_()

    def reduce_scatter_grads(self, num_ranks: int) -> int:
        self.master.grad = self._flat_grads().div_(num_ranks)
        return 0

    @torch.no_grad()
    def all_gather_params(self) -> int:
        self._write_params(self.master.detach())
        return 0


class ExpertShards:
    """The distributed mechanics of one SwiftMoE layer's expert shards.

    ``master`` is the layer's ``expert_shard`` ``[E, P/N]`` (rank r's shard r of every expert,
    fp32), updated in place by the optimizer; this class moves gradients from the slots into
    it and updated weights from it into the slots. Shared by :class:`SwiftMoEOptimizer` and the
    Megatron-LM plugin's expert optimizer.

    Each transfer is one all-to-all, in two halves: ``start_*`` builds the send buffer and
    launches the collective (``async_op=True``: it returns at once), ``finish_*`` waits for it
    and uses what arrived. The synchronous methods (:meth:`reduce_scatter_grads`,
    :meth:`scatter_params`) are the two halves back to back, so both paths compute the same
    bits; :mod:`megatron_swiftmoe.core.overlap` decides when the halves run when they overlap
    with compute. The index bookkeeping runs on the host placement (``layer.host_placement``),
    so starting a transfer never waits for the device.

    Args:
        layer: the SwiftMoE layer.
        group: the communicator of the transfers: the layer's own group (default) or another
            over the same ranks in the same order (``overlap.expert_comm_groups``).
    """

    def __init__(self, layer: SwiftMoELayer, group: Optional[dist.ProcessGroup] = None):
        self.layer = layer
        self.group = group or layer.group
        self.num_ranks = layer.num_ranks
        self.expert_numel = layer.experts.expert_numel
        self.shard_numel = layer.shard_numel
        self.padded = self.shard_numel * self.num_ranks
        self.master = layer.expert_shard
        self._grad_exchange: Optional[tuple] = None  # (work, send, recv, distinct) in flight
        self._slot_sums: Optional[torch.Tensor] = None  # [S], of the last reduction's slot gradients
        self._param_exchange: Optional[tuple] = None  # (work, send, recv, mine, slot experts) in flight
        self._planned: Optional[torch.Tensor] = None  # the next placement, planned early (plan_early)

    def _distinct(self, placement: torch.Tensor) -> tuple[torch.Tensor, list[int], torch.Tensor]:
        """The sorted distinct experts each rank holds, from ``placement`` ``[N, S]`` (host):
        ``(all of them rank after rank [U_total], U per rank (N ints), this rank's [U])``."""
        experts = placement.sort(dim=1).values
        first = torch.ones_like(experts, dtype=torch.bool)
        first[:, 1:] = experts[:, 1:] != experts[:, :-1]
        return experts[first], first.sum(1).tolist(), experts[self.layer.rank][first[self.layer.rank]]

    def _exchange(self, recv: torch.Tensor, send: torch.Tensor, recv_sizes: list[int], send_sizes: list[int],
                  async_op: bool) -> Optional[dist.Work]:
        """The shards' collective: a variable-size all-to-all over :attr:`group`."""
        return dist.all_to_all_single(recv, send, output_split_sizes=recv_sizes, input_split_sizes=send_sizes,
                                      group=self.group, async_op=async_op)

    def _on_device(self, index: torch.Tensor) -> torch.Tensor:
        return index.to(self.master.device, non_blocking=True)

    # ---- gradients: slots -> owners' shards

    @property
    def grad_reduction_started(self) -> bool:
        return self._grad_exchange is not None

    def start_grad_reduction(self, async_op: bool = False) -> int:
        """Sum the local replicas of each expert and launch the all-to-all that delivers shard r
        of every local expert to rank r. The slot gradients are released (the send buffer holds
        their sum). Returns bytes sent."""
        if self._grad_exchange is not None:
            raise RuntimeError(f"the expert gradient reduction of {self._name()} was started twice in one step")
        experts = self.layer.experts
        params = (experts.fc1, experts.fc2)
        slot_grads = [
            (param_grad(p) if param_grad(p) is not None else torch.zeros_like(p)).to(self.master.dtype) for p in params
        ]
        slot_flat = experts.flat_slots(*slot_grads)  # [S, P]
        placement = self.layer.host_placement
        distinct, counts, local_experts = self._distinct(placement)
        summed = slot_flat.new_zeros(local_experts.numel(), self.padded)
        slot_rows = torch.searchsorted(local_experts, placement[self.layer.rank])  # as in scatter_params
        summed[:, : self.expert_numel].index_add_(0, self._on_device(slot_rows), slot_flat)
        # Non-finite iff the slot's gradient is (NaN stays NaN, an Inf Inf or NaN): what
        # nonfinite_slots reports once the slot gradients are gone. One more read, no synchronisation.
        self._slot_sums = slot_flat.sum(dim=1)
        del slot_grads, slot_flat
        for param in params:
            param.grad = None
            if hasattr(param, "main_grad"):
                param.main_grad = None
        # [U, N, shard] -> [N, U, shard]: destination-major for the all-to-all.
        send = summed.view(-1, self.num_ranks, self.shard_numel).transpose(0, 1).contiguous()
        recv_rows = [count * self.shard_numel for count in counts]
        recv = send.new_empty(sum(recv_rows))
        send_rows = [local_experts.numel() * self.shard_numel] * self.num_ranks
        work = self._exchange(recv, send.view(-1), recv_rows, send_rows, async_op)
        self._grad_exchange = (work, send, recv, distinct)
        return send.numel() * send.element_size()

    def finish_grad_reduction(self, scale: Optional[float] = None) -> None:
        """Wait for the reduction, then sum what arrived into ``master.grad``, times ``scale``
        (default ``1 / layer.dp_cp_size``: averaged over the data x context-parallel ranks, as
        Megatron averages expert gradients; ``1 / N`` without tensor parallelism)."""
        if self._grad_exchange is None:
            raise RuntimeError(f"the expert gradient reduction of {self._name()} was never started")
        work, _, recv, distinct = self._grad_exchange
        self._grad_exchange = None
        if work is not None:
            work.wait()
        grad = torch.zeros_like(self.master)
        grad.index_add_(0, self._on_device(distinct), recv.view(-1, self.shard_numel))
        self.master.grad = grad.mul_(1.0 / self.layer.dp_cp_size if scale is None else scale)

    def reduce_scatter_grads(self, scale: Optional[float] = None) -> int:
        """Sum all replicas' gradients into the owners' ``master.grad``, times ``scale``
        (default as :meth:`finish_grad_reduction`), synchronously.

        Local replicas of one expert are summed first, then every rank sends shard r of each of
        its distinct experts to rank r. Returns bytes sent.
        """
        sent = self.start_grad_reduction()
        self.finish_grad_reduction(scale)
        return sent

    def _name(self) -> str:
        return f"MoE layer {self.layer.layer_number}"

    @torch.no_grad()
    def nonfinite_grad_experts(self) -> torch.Tensor:
        """Experts whose shard gradient on this rank holds a NaN or Inf, ``[k]`` (local, no
        collective). Valid once the reduction into ``master.grad`` has completed."""
        if self.master.grad is None:
            return torch.zeros(0, dtype=torch.long)
        return (~torch.isfinite(self.master.grad).all(dim=1)).nonzero().flatten().cpu()

    @torch.no_grad()
    def nonfinite_slots(self) -> dict[int, str]:
        """Local slots whose gradient holds a NaN or Inf: ``{slot: "NaN" or "Inf"}`` (local):
        where a non-finite shard gradient came from. From the slot gradients while they are
        there, else from their sums recorded when this step's reduction started (an Inf next
        to a -Inf reads NaN)."""
        experts = self.layer.experts
        grads = [param_grad(p) for p in (experts.fc1, experts.fc2)]
        if all(grad is not None for grad in grads):
            flat = experts.flat_slots(*grads)
            nonfinite, has_nan = ~torch.isfinite(flat).all(dim=1), flat.isnan().any(dim=1)
        elif self._slot_sums is not None:
            nonfinite, has_nan = ~torch.isfinite(self._slot_sums), self._slot_sums.isnan()
        else:
            return {}
        return {slot: "NaN" if bool(has_nan[slot]) else "Inf" for slot in nonfinite.nonzero().flatten().tolist()}

    @torch.no_grad()
    def migrate(self, next_placement: torch.Tensor, adam_state: dict) -> tuple[int, int]:
        """FlexMoE-like re-plan: move each newly placed expert's params and optimizer state.

        In a system whose optimizer state lives with the replicas, a rank that receives an
        expert it did not hold needs that expert's parameters, fp32 master weights and both
        Adam moments. Here every shard owner sends its shard of the fp32 state (one all-to-all)
        and of the parameters in the model dtype (another) to every such rank, so the bytes
        and the buffers are the real ones. The copies are then dropped: the static shards stay
        authoritative, which keeps the math identical to SwiftMoE's. Returns (bytes sent,
        bytes of the send and receive buffers).
        """
        # The FlexMoE-like baseline: plain host code, once per re-plan.
        current = [set(row) for row in self.layer.host_placement.tolist()]
        arrivals = [sorted(set(new) - old) for old, new in zip(current, next_placement.cpu().tolist())]
        master = self.master.detach()
        state = adam_state.get(self.master, {})
        moments = [state.get(key, torch.zeros_like(master)) for key in ("exp_avg", "exp_avg_sq")]
        sent = held = 0
        for tensors, dtype in (([master, *moments], master.dtype), ([master], self.layer.experts.fc1.dtype)):
            phase_sent, phase_held = self._send_rows(tensors, arrivals, dtype)
            sent, held = sent + phase_sent, held + phase_held
        return sent, held

    def _send_rows(self, tensors: list[torch.Tensor], arrivals: list[list[int]], dtype) -> tuple[int, int]:
        """Send this rank's shard of rows ``arrivals[j]`` of every tensor to rank j (one all-to-all).

        Returns (bytes sent, bytes of the send and receive buffers).
        """
        device = tensors[0].device
        send = [
            torch.cat([t[torch.tensor(experts, dtype=torch.long, device=device)].to(dtype).reshape(-1) for t in tensors])
            for experts in arrivals
        ]
        send_sizes = [chunk.numel() for chunk in send]
        recv_size = len(tensors) * len(arrivals[self.layer.rank]) * self.shard_numel
        recv = torch.empty(recv_size * self.num_ranks, dtype=dtype, device=device)
        dist.all_to_all_single(
            recv, torch.cat(send), output_split_sizes=[recv_size] * self.num_ranks,
            input_split_sizes=send_sizes, group=self.group,
        )
        element = recv.element_size()
        return sum(send_sizes) * element, (sum(send_sizes) + recv.numel()) * element

    # ---- the next placement

    def record_popularity(self) -> None:
        """Copy the step popularity to the host without waiting for the device (after each
        training forward), so that :meth:`plan_early` plans without a device synchronisation."""
        popularity = self.layer.step_popularity
        if popularity.device.type == "cpu":
            self._host_popularity, self._popularity_copied = popularity.clone(), None
            return
        if getattr(self, "_host_popularity", None) is None or self._host_popularity.device.type != "cpu":
            self._host_popularity = torch.empty(popularity.shape, dtype=popularity.dtype, pin_memory=True)
        self._host_popularity.copy_(popularity, non_blocking=True)
        self._popularity_copied = torch.get_device_module(popularity.device.type).Event()
        self._popularity_copied.record()

    def plan_early(self) -> None:
        """Plan the next placement now (the step's popularity is final: its last forward has
        run), from the host copy of :meth:`record_popularity`; :meth:`advance` takes it. Only
        for SwiftMoE's per-step re-plan (``replan_interval`` 1): a FlexMoE-like re-plan plans and
        migrates in :meth:`advance`."""
        if self.layer.swiftmoe.replan_interval != 1:
            return
        popularity = getattr(self, "_host_popularity", None)
        if popularity is None:
            popularity = self.layer.step_popularity
        elif self._popularity_copied is not None:
            self._popularity_copied.synchronize()
        self._planned = plan_placement(popularity, self.num_ranks, self.layer.swiftmoe)

    def discard_plan(self) -> None:
        """Forget an early plan that no step used (the optimizer skipped the step)."""
        self._planned = None

    @torch.no_grad()
    def advance(self, steps: int, adam_state: dict, async_op: bool = False) -> tuple[int, int, int]:
        """After optimizer step number ``steps``: re-plan when due, send the updated shards to the
        slots of the (new) placement; with ``async_op`` the slots are written by
        :meth:`finish_param_transfer`. Returns (parameter bytes, migration bytes, migration peak).
        """
        layer = self.layer
        next_placement, self._planned = self._planned, None
        migrated = peak = 0
        if steps % layer.swiftmoe.replan_interval == 0:
            if next_placement is None:
                next_placement = plan_placement(layer.step_popularity, self.num_ranks, layer.swiftmoe)
            layer.step_popularity.zero_()
            if layer.swiftmoe.replan_interval > 1:
                migrated, peak = self.migrate(next_placement, adam_state)
        else:
            next_placement = layer.host_placement.clone()
        sent = self.start_param_transfer(next_placement, async_op)
        if not async_op:
            self.finish_param_transfer()
        return sent, migrated, peak

    # ---- parameters: owners' shards -> slots of a placement

    @property
    def param_transfer_pending(self) -> bool:
        return self._param_exchange is not None

    @torch.no_grad()
    def start_param_transfer(self, next_placement: torch.Tensor, async_op: bool = False) -> int:
        """Launch the all-to-all that sends every owner's updated shards to the slots of
        ``next_placement`` and install that placement; :meth:`finish_param_transfer` writes the
        slots. Returns bytes sent."""
        self.finish_param_transfer()  # at most one transfer in flight per layer
        host = next_placement.cpu()
        distinct, counts, mine = self._distinct(host)
        send = self.master.detach()[self._on_device(distinct)].to(self.layer.experts.fc1.dtype)
        send_rows = [count * self.shard_numel for count in counts]
        recv = send.new_empty(self.num_ranks, mine.numel(), self.shard_numel)
        work = self._exchange(recv.view(-1), send.view(-1), [mine.numel() * self.shard_numel] * self.num_ranks,
                              send_rows, async_op)
        self._param_exchange = (work, send, recv, mine, host[self.layer.rank])
        self.layer.set_placement(host)
        return send.numel() * send.element_size()

    @torch.no_grad()
    def finish_param_transfer(self) -> None:
        """Wait for the transfer in flight, if any, and write its weights into the slots."""
        if self._param_exchange is None:
            return
        work, _, recv, mine, slot_experts = self._param_exchange
        self._param_exchange = None
        if work is not None:
            work.wait()
        full = recv.transpose(0, 1).reshape(mine.numel(), self.padded)[:, : self.expert_numel]
        self.layer.experts.load_flat(full[self._on_device(torch.searchsorted(mine, slot_experts))])

    @torch.no_grad()
    def scatter_params(self, next_placement: torch.Tensor) -> int:
        """Send updated shards to the slots of ``next_placement`` and install it. Returns bytes sent."""
        sent = self.start_param_transfer(next_placement)
        self.finish_param_transfer()
        return sent


@dataclass
class StepStats:
    """What one optimizer step did. Bytes are what this rank handed to collectives."""

    grad_norm: float = 0.0
    skipped: bool = False
    bytes_sent: dict[str, int] = field(default_factory=dict)
    migration_peak_bytes: int = 0  # extra memory of a FlexMoE-like migration (send + receive)


def describe_nonfinite_grads(shards_list: list[ExpertShards]) -> str:
    """Where the non-finite gradients are, the same text on every rank (collective over the
    world: call it on every rank, once a gradient norm reduced over all ranks was not finite).

    Names each rank whose expert slots hold a NaN or Inf, with the layer, slot and expert; if no
    slot gradient is left to look at, the ranks whose shards received them; if neither, the
    dense (non-expert) gradients.
    """
    slots, shards = [], []
    for index, layer_shards in enumerate(shards_list):
        number = layer_shards.layer.layer_number
        layer = f"transformer layer {number}" if number is not None else f"MoE layer {index}"
        experts = layer_shards.layer.slot_experts.cpu()
        slots += [f"{layer}, slot {slot} (expert {int(experts[slot])}): {kind}"
                  for slot, kind in layer_shards.nonfinite_slots().items()]
        reduced = layer_shards.nonfinite_grad_experts()
        if len(reduced):
            shards.append(f"{layer}, its shard of expert(s) {reduced.tolist()}")
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (slots, shards))
    found = [[f"rank {rank}: {where}" for rank, places in enumerate(everyone) for where in places[kind]]
             for kind in (0, 1)]
    lines = found[0] or found[1]  # where they came from, else where they arrived
    if not lines:
        return "NaN or Inf in the dense (non-expert) gradients; every expert gradient is finite"
    shown = lines[:8] + ([f"... and {len(lines) - 8} more"] if len(lines) > 8 else [])
    return "NaN or Inf in the expert gradients of " + "; ".join(shown)


def refresh_slots(shards_list: list[ExpertShards]) -> None:
    """Write every layer's shards into the slots of its current placement, after the shards
    changed outside the optimizer (a load): the slots are a cache of them (collective)."""
    for shards in shards_list:
        shards.finish_param_transfer()  # a transfer still in flight carries the old weights
    for shards in shards_list:
        shards.scatter_params(shards.layer.placement)


class SwiftMoEOptimizer:
    """AdamW over a model containing :class:`SwiftMoELayer` layers, sharded as described above.

    Args:
        model: the model or its chunks.
        lr, weight_decay, betas, eps: AdamW settings. Biases and 1-D parameters (norms) get no
            weight decay, as in Megatron.
        clip_grad: global gradient-norm clip (0 disables); every parameter counts once,
            not once per replica nor per pipeline stage that holds a copy.
        group: data-parallel group; defaults to Megatron's (with pipeline stages: this stage's).
        loss_scaler: a :class:`DynamicLossScaler` for fp16; ``None`` for fp32/bf16.
        overlap_grad_reduce, overlap_param_gather: overlap the expert gradient reduction with
            backward and the re-placement with the next forward (:mod:`.overlap`); the dense
            ZeRO-1 traffic stays synchronous.
        timeout: of the communicator of the overlapped expert traffic.

    Usage per step: ``zero_grad()``, forward/backward over the micro-batches
    (``scale_loss(loss).backward()``; with ``overlap_grad_reduce`` all but the last inside
    ``no_sync()``, Megatron's ``config.no_sync_func``), then ``step()``. With
    ``overlap_param_gather`` call ``finish_param_sync()`` before evaluating, saving or exiting.
    """

    def __init__(
        self,
        model: torch.nn.Module | Iterable[torch.nn.Module],
        lr: float,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        clip_grad: float = 0.0,
        group: Optional[dist.ProcessGroup] = None,
        loss_scaler: Optional[DynamicLossScaler] = None,
        overlap_grad_reduce: bool = False,
        overlap_param_gather: bool = False,
        timeout=None,
    ):
        modules = [model] if isinstance(model, torch.nn.Module) else list(model)
        self.group = group or parallel_state.get_data_parallel_group()
        self.pipeline_group = parallel_state.get_pipeline_model_parallel_group()  # the other stages
        self.num_ranks = dist.get_world_size(self.group)
        self.clip_grad = clip_grad
        self.loss_scaler = loss_scaler
        self.layers = swiftmoe_layers(modules)
        # Every MoE layer's router, SwiftMoE's or Megatron's stock one (the static baseline).
        self.routers = [m.router for module in modules for m in module.modules() if isinstance(m, MoELayer)]
        slot_params = {id(p) for layer in self.layers for p in layer.experts.parameters()}

        # (weight decay?, replicated on all ranks?, in the gradient norm?) -> params; Megatron's
        # no-decay rule.
        buckets: dict[tuple[bool, bool, bool], list] = {}
        seen = set()
        for module in modules:
            for name, param in module.named_parameters():
                if not param.requires_grad or id(param) in seen:
                    continue
                seen.add(id(param))
                if param.dtype != master_dtype(param.dtype):
                    attach_main_grad(param)
                if id(param) in slot_params:
                    continue
                decays = not (param.ndim == 1 or name.endswith(".bias"))
                key = (decays, getattr(param, "allreduce", True), param_is_not_shared(param))
                buckets.setdefault(key, []).append(param)
        self.dense = [
            _DenseShard(params, self.group) if replicated else _LocalParams(params)
            for (_, replicated, _), params in sorted(buckets.items(), reverse=True)
        ]
        self._in_norm = [counted for _, _, counted in sorted(buckets, reverse=True)] + [True] * len(self.layers)
        overlap = overlap_grad_reduce or overlap_param_gather
        groups = expert_comm_groups(self.layers, timeout) if overlap else [None] * len(self.layers)
        self.expert_shards = [ExpertShards(layer, group) for layer, group in zip(self.layers, groups)]
        # After attach_main_grad above: its gradient hooks run before the traffic's.
        self.traffic = ExpertTraffic(self.expert_shards, overlap_grad_reduce, overlap_param_gather)
        self._params = [p for module in modules for p in module.parameters() if p.requires_grad]

        # wd_mult: Megatron's OptimizerParamScheduler sets weight_decay = wd * wd_mult per group.
        groups = [
            {"params": [shard.master], "weight_decay": weight_decay * decays, "wd_mult": float(decays)}
            for (decays, _, _), shard in zip(sorted(buckets, reverse=True), self.dense)
        ]
        if self.expert_shards:
            groups.append(
                {"params": [s.master for s in self.expert_shards], "weight_decay": weight_decay, "wd_mult": 1.0}
            )
        self.adamw = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.steps = 0

    @property
    def param_groups(self) -> list[dict]:
        """AdamW's param groups (``lr`` and ``weight_decay`` may be set by a scheduler)."""
        return self.adamw.param_groups

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.loss_scaler.scale if self.loss_scaler else loss

    def zero_grad(self) -> None:
        self.traffic.reset()
        for param in self._params:
            param.grad = None
            if hasattr(param, "main_grad"):
                param.main_grad = None

    def no_sync(self):
        """Context of the micro-batches whose gradients only accumulate (``config.no_sync_func``)."""
        return self.traffic.no_sync()

    def start_grad_sync(self, *unused) -> None:
        """Start the expert gradient reductions not started yet (``config.grad_sync_func``)."""
        self.traffic.start_grad_sync()

    def finish_param_sync(self) -> None:
        """Write every slot whose re-placement is still in flight (before eval, saves, exit)."""
        self.traffic.finish_param_sync()

    def _masters(self) -> list[torch.Tensor]:
        return [s.master for s in self.dense] + [s.master for s in self.expert_shards]

    def _unscale_and_norm(self) -> tuple[float, bool]:
        """Unscale gradients (fp16), then the global norm over owned shards and an inf check."""
        grads = [m.grad for m in self._masters()]
        if self.loss_scaler:
            for grad in grads:
                grad.div_(self.loss_scaler.scale)
        counted = [g for g, in_norm in zip(grads, self._in_norm) if in_norm]
        sum_sq = torch.stack([g.double().square().sum() for g in counted]).sum() if counted else torch.zeros(())
        sum_sq = sum_sq.to(grads[0].device if grads else "cpu")
        dist.all_reduce(sum_sq, group=self.group)
        if dist.get_world_size(self.pipeline_group) > 1:
            dist.all_reduce(sum_sq, group=self.pipeline_group)
        norm = math.sqrt(sum_sq.item())
        return norm, not math.isfinite(norm)

    def step(self) -> StepStats:
        """Reduce gradients to their owners, clip, AdamW, send parameters to the next placement."""
        stats = StepStats()
        sent = stats.bytes_sent
        sent["dense_grad"] = sum(d.reduce_scatter_grads(self.num_ranks) for d in self.dense)
        sent["expert_grad"] = self.traffic.finish_grad_sync()

        stats.grad_norm, stats.skipped = self._unscale_and_norm()
        if stats.skipped and not self.loss_scaler:
            # fp16 loss scaling skips such a step (a signal to lower the scale); otherwise they
            # stop the run before anything is stepped (the norm is the same on every rank).
            raise NonFiniteGradients(describe_nonfinite_grads(self.expert_shards))
        if self.loss_scaler:
            self.loss_scaler.update(stats.skipped)
        if not stats.skipped:
            clip_coeff = self.clip_grad / (stats.grad_norm + 1e-6)  # Megatron's (and torch's) rule
            if self.clip_grad > 0 and clip_coeff < 1.0:
                for master in self._masters():
                    master.grad.mul_(clip_coeff)
            self.adamw.step()

        self.steps += 1
        sent["dense_param"] = sum(d.all_gather_params() for d in self.dense)
        sent["expert_param"], sent["expert_migration"], stats.migration_peak_bytes = self.traffic.start_param_sync(
            self.steps, self.adamw.state)
        for router in self.routers:
            self._update_expert_bias(router)
        return stats

    @staticmethod
    def _update_expert_bias(router) -> None:
        # What Megatron-LM's finalize_model_grads does for aux-loss-free balancing.
        if getattr(router, "enable_expert_bias", False):
            router.expert_bias.copy_(
                get_updated_expert_bias(
                    router.local_tokens_per_expert, router.expert_bias, router.config.moe_router_bias_update_rate
                )
            )
            router.local_tokens_per_expert.zero_()

    def state_dict(self) -> dict:
        """This rank's optimizer state: its master shards, AdamW moments, loss scale."""
        return {
            "masters": [m.detach().clone() for m in self._masters()],
            "adamw": self.adamw.state_dict(),
            "loss_scaler": self.loss_scaler.state_dict() if self.loss_scaler else None,
            "steps": self.steps,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output saved by the same rank of an identical setup."""
        masters = self._masters()
        saved = state["masters"]
        if [tuple(m.shape) for m in masters] != [tuple(m.shape) for m in saved]:
            raise ValueError(
                "optimizer state does not match this model: master shard shapes "
                f"{[tuple(m.shape) for m in saved]} in the checkpoint vs {[tuple(m.shape) for m in masters]} "
                "here (different model size, world size or --swiftmoe setting)"
            )
        for master, value in zip(masters, saved):
            master.copy_(value)  # in place: the master tensors stay the same objects
        refresh_slots(self.expert_shards)
        self.adamw.load_state_dict(state["adamw"])
        self.steps = state.get("steps", 0)
        if self.loss_scaler and state.get("loss_scaler"):
            self.loss_scaler.load_state_dict(state["loss_scaler"])
