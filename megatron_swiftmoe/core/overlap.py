"""SwiftMoE's expert traffic overlapped with compute, the way Megatron overlaps its DDP buckets.

Two transfers per layer and step move expert bytes (:class:`~.optimizer.ExpertShards`): the slot
gradients to the shard owners before the optimizer step, and the updated shards to the slots of
the next placement after it. Without overlap both run between backward and the next forward,
on the critical path. :class:`ExpertTraffic` schedules them like Megatron's
``--overlap-grad-reduce`` and ``--overlap-param-gather``:

* **Gradients.** A post-accumulate-grad hook on each layer's slot parameters (registered after
  the fp32 ``main_grad`` accumulation hook, so it sees the accumulated gradient) notes when both
  have their gradient. On the last micro-batch of a step (outside :meth:`ExpertTraffic.no_sync`,
  which Megatron's schedules enter for the others through ``config.no_sync_func``) the layer's
  reduction starts as one asynchronous all-to-all, while backward goes on through the layers
  before it. Layers start in reverse layer order on every rank (a layer whose gradients are
  ready waits for the layers after it), so every rank issues the collectives in the same order.
  :meth:`~ExpertTraffic.start_grad_sync` starts what has not started (Megatron's
  ``config.grad_sync_func``: with pipeline stages, after the cooldown);
  :meth:`~ExpertTraffic.finish_grad_sync` waits for all of them, where Megatron waits for its
  buckets (``finalize_model_grads``; the trainer: before the step).
* **Planning.** The layer's step popularity is final once its last forward has run, so its next
  placement is planned when its reduction starts (without overlap: when it is done), on the
  host while the collective and the rest of backward run (from a host copy made after each
  training forward without waiting for the device); the step only installs it.
* **Re-placement.** After the optimizer step every layer's transfer to the next placement
  starts asynchronously (layer order) and the placement is installed; a forward pre-hook on
  the layer's slots waits for that layer's transfer and writes its slots just before they
  compute, so layer L's transfer hides behind the forward of the layers before it.
  :meth:`~ExpertTraffic.finish_param_sync` waits for every transfer: before evaluation,
  checkpoints and exit (Megatron's ``disable_forward_pre_hook(param_sync=True)`` points).

The overlapped transfers run on their own communicator (:func:`expert_comm_groups`), so the
token all-to-alls of the layers' forward and backward are not queued behind them. Every
collective is issued by every rank of the group in the same order, so a rank never waits for
one its peers do not issue; a rank that fails leaves its peers' waits to fail or time out like
any collective.

Memory: each started gradient reduction holds a send and a receive buffer (about the layer's
slot gradients each, fp32) until :meth:`~ExpertTraffic.finish_grad_sync`; the slot gradients
themselves are released when the send buffer is built. Each started re-placement holds its
buffers (the layer's distinct experts, model dtype) until the layer's next forward.

Results are bit-identical to the synchronous path: the collectives only move data, and the
sums are the same local operations in the same order. A FlexMoE-like re-plan
(``replan_interval`` > 1) plans and migrates synchronously in the step.

Tested on CPU with gloo; the NCCL path (CUDA streams, pinned host copies) has not run in this
project's CI: ``scripts/gpu_check.sh`` measures it on a machine with several GPUs.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
from typing import TYPE_CHECKING, Iterator, Optional

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from megatron_swiftmoe.core.optimizer import ExpertShards


def expert_comm_groups(layers: list, timeout: Optional[datetime.timedelta] = None) -> list[dist.ProcessGroup]:
    """For each layer, a second communicator over the ranks of its group (same order), for
    SwiftMoE's overlapped expert traffic: one communicator runs its collectives in issue order
    (NCCL on one stream, gloo from one queue), so traffic in flight on the layer's group would
    delay the token all-to-alls queued behind it. One per rank set.

    Collective over the whole world: every rank calls it (with its own layers, maybe none) and
    creates every group, in the same order, as ``new_group`` requires (with NCCL a new group
    may be split from the world's communicator, which every rank must join). A group whose
    ranks are not in ascending order (which ``new_group`` would reorder) is used as it is."""
    wanted = sorted({tuple(dist.get_process_group_ranks(layer.group)) for layer in layers})
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, [ranks for ranks in wanted if list(ranks) == sorted(ranks)])
    created = {ranks: dist.new_group(list(ranks), timeout=timeout) for ranks in sorted(set().union(*everyone))}
    return [created.get(tuple(dist.get_process_group_ranks(layer.group)), layer.group) for layer in layers]


class ExpertTraffic:
    """When the expert collectives of some SwiftMoE layers (one model chunk) start and end:
    overlapped as described above, or (both flags off) synchronously in the step.

    Args:
        shards: the layers' :class:`ExpertShards`, in layer order.
        grad_reduce: overlap the gradient reduction with backward (``--overlap-grad-reduce``).
        param_gather: overlap the re-placement with the next forward (``--overlap-param-gather``).
        grad_scale: factor of the reduced gradients (``ExpertShards.finish_grad_reduction``).

    Build it after any ``attach_main_grad`` of the slot parameters (its hooks must run after
    that one). Usage per step: ``reset()``; the micro-batches, all but the last inside
    ``no_sync()``; ``finish_grad_sync()``; the optimizer step on the shards;
    ``start_param_sync(steps, adam_state)``.
    """

    def __init__(self, shards: list[ExpertShards], grad_reduce: bool, param_gather: bool,
                 grad_scale: Optional[float] = None):
        self.shards = shards
        self.grad_reduce = grad_reduce
        self.param_gather = param_gather
        self.grad_scale = grad_scale
        self.is_last_microbatch = True
        self._ready = [False] * len(shards)
        self._arrived: list[set[int]] = [set() for _ in shards]
        self._next = len(shards) - 1  # the layer whose reduction starts next (reverse layer order)
        self._finished = False
        self._factor: Optional[torch.Tensor | float] = None
        self.grad_bytes = 0  # sent by this step's reductions
        if grad_reduce:
            for index, layer_shards in enumerate(shards):
                experts = layer_shards.layer.experts
                for param in (experts.fc1, experts.fc2):
                    param.register_post_accumulate_grad_hook(functools.partial(self._grad_arrived, index))
                layer_shards.layer.register_forward_hook(functools.partial(self._forward_done, layer_shards))
        if param_gather:
            for layer_shards in shards:
                layer_shards.layer.experts.register_forward_pre_hook(
                    functools.partial(self._before_slots_compute, layer_shards))

    # ---- hooks

    @staticmethod
    def _forward_done(shards: ExpertShards, module, *unused) -> None:
        if module.training and torch.is_grad_enabled():
            shards.record_popularity()

    @staticmethod
    def _before_slots_compute(shards: ExpertShards, *unused) -> None:
        shards.finish_param_transfer()

    def _grad_arrived(self, index: int, param: torch.nn.Parameter) -> None:
        if not self.is_last_microbatch:
            return
        if self.shards[index].grad_reduction_started:
            raise RuntimeError(
                f"a slot gradient of {self.shards[index]._name()} arrived after its reduction started: with "
                "--overlap-grad-reduce every micro-batch but the last must run inside no_sync() "
                "(Megatron's schedules do so through config.no_sync_func)"
            )
        self._arrived[index].add(id(param))
        if len(self._arrived[index]) == 2:
            self._ready[index] = True
            while self._next >= 0 and self._ready[self._next]:
                self._start(self._next)

    def _start(self, index: int) -> None:
        shards = self.shards[index]
        self.grad_bytes += shards.start_grad_reduction(async_op=self.grad_reduce)
        shards.plan_early()  # on the host, while the collective runs
        self._next = index - 1

    # ---- gradients

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Micro-batches whose gradients only accumulate (all but a step's last)."""
        self.is_last_microbatch = False
        try:
            yield
        finally:
            self.is_last_microbatch = True

    def start_grad_sync(self, *unused) -> None:
        """Start every reduction not started yet, in reverse layer order."""
        while self._next >= 0:
            self._start(self._next)

    def finish_grad_sync(self) -> int:
        """Start what has not started, wait for every reduction: each layer's shard gradients
        are in its ``master.grad``. Returns the bytes this rank sent this step."""
        self.start_grad_sync()
        for shards in self.shards:
            if shards.grad_reduction_started:
                shards.finish_grad_reduction(self.grad_scale)
        self._finished = True
        if self._factor is not None:
            self.scale_grads(self._factor)
            self._factor = None
        return self.grad_bytes

    def scale_grads(self, factor: torch.Tensor | float) -> None:
        """Multiply this step's shard gradients by ``factor`` (e.g. Megatron's 1 / tokens with
        per-token losses): now if the reductions are finished, else when they are; the same
        operations either way, so the overlapped and the synchronous path agree bit for bit."""
        if not self._finished:
            self._factor = factor if self._factor is None else self._factor * factor
            return
        for shards in self.shards:
            if shards.master.grad is not None:
                shards.master.grad.mul_(factor)

    def reset(self) -> None:
        """Start of a step: no gradient has arrived; an unused early plan is dropped."""
        for shards in self.shards:
            if shards.grad_reduction_started:  # a step abandoned after its reductions started
                shards.finish_grad_reduction(self.grad_scale)
            shards.discard_plan()
        self._ready = [False] * len(self.shards)
        self._arrived = [set() for _ in self.shards]
        self._next = len(self.shards) - 1
        self._finished = False
        self._factor = None
        self.grad_bytes = 0
        self.is_last_microbatch = True

    # ---- parameters

    def start_param_sync(self, steps: int, adam_state: dict) -> tuple[int, int, int]:
        """After optimizer step ``steps``: every layer's transfer to its next placement, started
        asynchronously with ``param_gather`` (else done now), in layer order. Returns (parameter
        bytes, migration bytes, largest migration peak)."""
        sent = migrated = peak = 0
        for shards in self.shards:
            param_bytes, migration_bytes, migration_peak = shards.advance(steps, adam_state, async_op=self.param_gather)
            sent, migrated, peak = sent + param_bytes, migrated + migration_bytes, max(peak, migration_peak)
        return sent, migrated, peak

    def finish_param_sync(self) -> None:
        """Wait for every transfer in flight and write its slots (before evaluation, checkpoints, exit)."""
        for shards in self.shards:
            shards.finish_param_transfer()
