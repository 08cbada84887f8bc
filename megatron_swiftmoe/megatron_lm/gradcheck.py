"""Non-finite expert gradients in Megatron-LM's training step, caught before any step.

Megatron checks its DDP buckets for NaN and Inf before their data-parallel reduction
(``--check-for-nan-in-loss-and-grad``, on by default, through its rerun state machine). The
expert slots are kept out of DDP, so SwiftMoE checks their gradients itself, in two places:

1. **Inside the forward-backward loop** (:func:`validate_expert_grads`, from
   ``finalize_model_grads``), when the rerun state machine validates results (``--rerun-mode
   validate_results``, Megatron's default): each SwiftMoE layer's local gradient norm (of its
   slots; of its shards once ``--overlap-grad-reduce`` has reduced them) goes
   to ``validate_result`` as each DDP bucket's norm does, so Megatron's own procedure follows: the
   iteration is re-run in place, then the job saves a checkpoint of the state before the
   iteration (nothing of it was stepped) and exits with 16 (reproduced: resume to re-run it
   elsewhere) or 17 (not reproduced), logging the rank, the layer and the iteration.
2. **After the expert-gradient reduction**, through the gradient norm, which counts every expert
   shard (``SwiftMoEChainedOptimizer.get_grad_norm``): it catches what the loop does not
   validate (Megatron skips the first iteration of a run, ``--rerun-mode disabled``, a NaN that
   arises in the reduction). With the check on, every rank stops with :data:`EXIT_CODE` and one
   message naming the ranks, layers, slots and the iteration; nothing is stepped, and no
   checkpoint is written on the way out. With ``--no-check-for-nan-in-loss-and-grad`` the step is
   skipped instead (Megatron counts a skipped iteration), as a loss-scale overflow is; fp16 with
   dynamic loss scaling (where Megatron turns the check off) skips through the loss scaler.

The norm costs no extra collective (Megatron reduces it anyway); the loop's check costs one host
synchronisation per iteration in the common case (all finite), DDP's check one per bucket.
"""

from __future__ import annotations

import torch

from megatron_swiftmoe.core.optimizer import param_grad

#: Exit status of a run stopped by non-finite gradients: Megatron's
#: ``EXIT_CODE_FAILED_ON_RESULT_VALIDATION``.
EXIT_CODE = 17


def _local_grad_norm(shards) -> torch.Tensor:
    """The norm of the expert gradient a layer holds on this rank: its slots' before their
    reduction, its shards' after it (with ``--overlap-grad-reduce`` it has run by now)."""
    if shards.master.grad is not None:
        grads = [shards.master.grad]
    else:
        grads = [grad for grad in map(param_grad, shards.layer.experts.parameters()) if grad is not None]
    norms = [torch.linalg.vector_norm(grad.float()) for grad in grads]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


@torch.no_grad()
def validate_expert_grads(shards_list: list, iteration: int) -> None:
    """Hand each layer's local expert-gradient norm (:class:`~megatron_swiftmoe.core.optimizer.ExpertShards`,
    layer order) to the rerun state machine (inside the forward-backward loop; only when it
    validates results: otherwise the norm check decides). ``iteration`` (from 1) goes into the
    message: the machine's own count is off by one in some Megatron versions."""
    from megatron.core.rerun_state_machine import RerunMode, RerunState, get_rerun_state_machine

    machine = get_rerun_state_machine()
    if not shards_list or machine.get_mode() != RerunMode.VALIDATE_RESULTS:
        return
    norms = torch.stack([_local_grad_norm(shards) for shards in shards_list])
    if machine.state == RerunState.INITIAL_RUN and bool(torch.isfinite(norms).all()):
        return  # the common case: one host synchronisation; a re-run validates every layer
    for index, (shards, norm) in enumerate(zip(shards_list, norms)):
        which = "shard gradients, after" if shards.master.grad is not None else "slot gradients, before"
        machine.validate_result(
            result=norm,
            rejection_func=lambda value: not bool(torch.isfinite(value)),
            message=f"found NaN or Inf in the local expert {which} their reduction, of SwiftMoE layer {index} "
            f"(transformer layer {shards.layer.layer_number}) in iteration {iteration}",
            tolerance=0.001,  # as Megatron's bucket check
            fatal=True,
        )
