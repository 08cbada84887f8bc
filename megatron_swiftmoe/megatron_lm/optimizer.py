"""SwiftMoE's expert optimizer inside Megatron-LM's optimizer chain.

Megatron builds its own optimizer (plain or ``--use-distributed-optimizer``) for every
parameter except the expert slots, which the plugin hides from it and from DDP. This module
adds :class:`SwiftMoEExpertOptimizer` for the experts and chains the two the way Megatron
chains its dense and expert optimizers, so that ``train_step`` drives one object:

* ``prepare_grads``: the slot gradients of all replicas are summed into the owners' shards
  (:meth:`ExpertShards.reduce_scatter_grads`), averaged like DDP averages data-parallel
  gradients, and unscaled by the loss scale of the dense optimizer (fp16);
* grad-norm clipping: the shards are distinct on every rank, so their squares are summed over
  the whole world (every expert parameter once) and combined with the dense norm;
* ``step_with_ready_grads``: AdamW on the shards, then the updated shards are sent to the slots
  of the next placement.

With ``--overlap-grad-reduce`` / ``--overlap-param-gather`` (read from each chunk's DDP config)
the two transfers overlap with backward and the next forward (:mod:`megatron_swiftmoe.core.overlap`):
each DDP chunk holds its layers' :class:`ExpertTraffic` (``swiftmoe_traffic``), driven by the
chunk's own synchronisation methods (:func:`_drive_with_ddp`).

The Adam moments are optimizer state; the expert weights themselves are model state (the
layers' ``expert_shard``), so ``--no-load-optim`` keeps them.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.distributed as dist

from megatron.core.optimizer import ChainedOptimizer, MegatronOptimizer

from megatron_swiftmoe.core.compat import default_device
from megatron_swiftmoe.core.layer import swiftmoe_layers
from megatron_swiftmoe.core.optimizer import (
    ExpertShards, NonFiniteGradients, attach_main_grad, describe_nonfinite_grads, refresh_slots,
)
from megatron_swiftmoe.core.overlap import ExpertTraffic, expert_comm_groups


class SwiftMoEExpertOptimizer(MegatronOptimizer):
    """AdamW over the expert shards of the SwiftMoE layers in ``model_chunks``.

    Args:
        config: Megatron's ``OptimizerConfig`` (the dense optimizer's, so they chain).
        model_chunks: the DDP-wrapped model chunks.
        loss_scale_source: the dense optimizer, whose loss scale the experts share.
        timeout: of the communicator of the overlapped expert traffic.
    """

    def __init__(self, config, model_chunks: list, loss_scale_source: MegatronOptimizer, timeout=None):
        layers = swiftmoe_layers(model_chunks)
        self.loss_scale_source = loss_scale_source
        # Per-token losses: DDP does not average over ranks, finalize_model_grads divides by tokens.
        self.per_token_loss = bool(layers and layers[0].config.calculate_per_token_loss)
        for layer in layers:
            for param in layer.experts.parameters():
                if param.dtype != torch.float32:
                    attach_main_grad(param)  # fp32 accumulation, like DDP's grad buffers
        self.traffics = [self._traffic(chunk, timeout) for chunk in model_chunks]
        self.shards = [shards for traffic in self.traffics for shards in traffic.shards]
        # One param group with Megatron's scheduler fields (see optimizer._get_param_groups).
        group = {
            "params": [shards.master for shards in self.shards],
            "wd_mult": 1.0,
            "lr_mult": 1.0,
            "is_decoupled_lr": False,
            "max_lr": config.lr,
            "min_lr": config.min_lr,
            "is_expert_parallel": True,
            "default_config": True,
        }
        adam = torch.optim.AdamW if config.decoupled_weight_decay else torch.optim.Adam
        optimizer = adam(
            [group], lr=config.lr, weight_decay=config.weight_decay,
            betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
        )
        super().__init__(optimizer, config, init_state_fn=None)
        self.is_stub_optimizer = not self.shards
        self.steps = 0
        self.bytes_sent = {"expert_grad": 0, "expert_param": 0, "expert_migration": 0}

    def _traffic(self, chunk, timeout) -> ExpertTraffic:
        """The expert traffic of one model chunk's layers, overlapped as its DDP config says
        (built after attach_main_grad: its gradient hooks must run after that one)."""
        ddp_config = getattr(chunk, "ddp_config", None)
        grad_reduce = bool(getattr(ddp_config, "overlap_grad_reduce", False))
        param_gather = bool(getattr(ddp_config, "overlap_param_gather", False))
        layers = swiftmoe_layers([chunk])
        groups = expert_comm_groups(layers, timeout) if grad_reduce or param_gather else [None] * len(layers)
        shards = [ExpertShards(layer, group) for layer, group in zip(layers, groups)]
        traffic = ExpertTraffic(shards, grad_reduce, param_gather, grad_scale=1.0 if self.per_token_loss else None)
        chunk.swiftmoe_traffic = traffic
        _drive_with_ddp(chunk, traffic)
        return traffic

    def finish_param_sync(self) -> None:
        """Write every slot whose re-placement is still in flight (before saves and loads)."""
        for traffic in self.traffics:
            traffic.finish_param_sync()

    # ---- gradients

    def get_grad_stats_parallel_group(self) -> Optional[dist.ProcessGroup]:
        # Shards are distinct on every rank of a stage's replica group (tensor x context x data
        # parallel) and layers are distinct across stages: sum over the world.
        return dist.group.WORLD

    def get_main_grads_for_grad_norm(self) -> list[torch.Tensor]:
        # Megatron's rule counts a tensor without ``tensor_model_parallel`` on tensor-parallel
        # rank 0 only (a replica); the shards of tensor-parallel peers differ: every one counts.
        return [shards.master.grad for shards in self.shards if shards.master.grad is not None]

    def get_grads_for_grad_norm(self, grad_norm_group: Optional[str] = None) -> list[torch.Tensor]:
        """core_v0.19's name for :meth:`get_main_grads_for_grad_norm`; the expert shards belong to
        no separate grad-norm group."""
        return [] if grad_norm_group is not None else self.get_main_grads_for_grad_norm()

    @torch.no_grad()
    def count_zeros(self) -> float:
        """Zeros among the expert gradients (``--log-num-zeros-in-grad``), every shard once."""
        zeros = torch.zeros((), dtype=torch.float64, device=default_device())
        for shards in self.shards:
            if shards.master.grad is not None:  # the zero padding of the last shards left out
                mine = min(max(shards.expert_numel - shards.layer.rank * shards.shard_numel, 0), shards.shard_numel)
                zeros += (shards.master.grad[:, :mine] == 0).sum()
        dist.all_reduce(zeros, group=self.get_grad_stats_parallel_group())
        return zeros.item()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for traffic in self.traffics:
            traffic.reset()
        for shards in self.shards:
            shards.master.grad = None
            for param in shards.layer.experts.parameters():
                param.grad = None
                if hasattr(param, "main_grad"):
                    param.main_grad = None

    def get_loss_scale(self) -> torch.Tensor:
        return self.loss_scale_source.get_loss_scale()

    @torch.no_grad()
    def prepare_grads(self) -> bool:
        """Slot gradients -> owners' shard gradients, unscaled; True if any is inf/nan (fp16)."""
        if self.is_stub_optimizer:
            return False
        self.bytes_sent["expert_grad"] = sum(traffic.finish_grad_sync() for traffic in self.traffics)
        grads = [shards.master.grad for shards in self.shards]
        if getattr(self.loss_scale_source, "grad_scaler", None) is None:
            return False
        found_inf = torch.zeros(1, dtype=torch.float32, device=grads[0].device)
        inv_scale = self.loss_scale_source.grad_scaler.inv_scale.to(grads[0].device)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
        dist.all_reduce(found_inf, op=dist.ReduceOp.MAX, group=self.get_grad_stats_parallel_group())
        return bool(found_inf.item() > 0)

    @torch.no_grad()
    def step_with_ready_grads(self) -> bool:
        """AdamW on the shards, then the updated shards go to the next placement's slots."""
        if self.is_stub_optimizer:
            return True
        self.optimizer.step()
        self.steps += 1
        sent = [traffic.start_param_sync(self.steps, self.optimizer.state) for traffic in self.traffics]
        self.bytes_sent["expert_param"] = sum(param_bytes for param_bytes, _, _ in sent)
        self.bytes_sent["expert_migration"] = sum(migrated for _, migrated, _ in sent)
        return True

    def step(self):
        found_inf = self.prepare_grads()
        if found_inf:
            return False, None, None
        grad_norm = self.clip_grad_norm(self.config.clip_grad) if self.config.clip_grad > 0 else self.get_grad_norm()
        return self.step_with_ready_grads(), grad_norm, None

    # ---- model state

    def reload_model_params(self, state_dict=None) -> None:
        """The expert weights changed outside the optimizer (a load): refill the slots."""
        refresh_slots(self.shards)

    # ---- optimizer state

    def _state(self, shards: ExpertShards) -> dict:
        """AdamW's state of one shard tensor, created (zeros) if it has not stepped yet."""
        state = self.optimizer.state[shards.master]
        if not state:
            state["step"] = torch.tensor(float(self.steps))
            state["exp_avg"] = torch.zeros_like(shards.master)
            state["exp_avg_sq"] = torch.zeros_like(shards.master)
        return state

    def state_dict(self) -> dict:
        """What every rank shares (torch format, saved by data-parallel rank 0); the moments are
        per rank and go to the plugin's per-rank files (:mod:`.checkpointing`)."""
        return {"steps": self.steps, "param_groups": self.optimizer.state_dict()["param_groups"]}

    def moments(self) -> list[dict[str, torch.Tensor]]:
        """This rank's Adam moments per layer (for the per-rank checkpoint files)."""
        return [{key: self._state(shards)[key] for key in ("exp_avg", "exp_avg_sq")} for shards in self.shards]

    @torch.no_grad()
    def load_moments(self, moments: list[dict[str, torch.Tensor]]) -> None:
        for shards, saved in zip(self.shards, moments):
            state = self._state(shards)
            for key in ("exp_avg", "exp_avg_sq"):
                state[key].copy_(saved[key])

    def sharded_state_dict(self, model_sharded_state_dict: dict, is_loading: bool = False, **kwargs) -> dict:
        """Adam moments keyed like the expert weights (``optimizer.state.<moment>.<weight key>``),
        each rank writing the rectangles its shards cover, so that they reshard like the weights."""
        from dataclasses import replace

        moments = {}
        weights = dict(_flat_items(model_sharded_state_dict))
        for index, shards in enumerate(self.shards):
            state = self._state(shards)
            prefix = f"{shards.layer._checkpoint_prefix}experts.swiftmoe_shard."
            for key, weight in weights.items():
                if not key.startswith(prefix):
                    continue
                expert, span = key[len(prefix) + 1 :].split(".")
                lo, hi = map(int, span.split("-"))
                for name in ("exp_avg", "exp_avg_sq"):
                    data = state[name][int(expert), lo:hi].view(weight.local_shape)
                    moments[f"{name}.{index}.{expert}.{span}"] = replace(
                        weight, key=f"optimizer.state.{name}.{weight.key}", data=data
                    )
        return {"steps": self.steps, "moments": moments}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        self.steps = int(state_dict["steps"])
        for group, saved in zip(self.optimizer.param_groups, state_dict.get("param_groups", [])):
            group.update({k: v for k, v in saved.items() if k != "params"})
        for key, value in state_dict.get("moments", {}).items():
            name, index, expert, span = key.split(".")
            lo, hi = map(int, span.split("-"))
            state = self._state(self.shards[int(index)])
            state[name][int(expert), lo:hi] = value.reshape(-1)
        for shards in self.shards:
            self._state(shards)["step"].fill_(float(self.steps))


def _drive_with_ddp(chunk, traffic: ExpertTraffic) -> None:
    """Make the DDP chunk's synchronisation methods drive its SwiftMoE expert traffic too, where
    Megatron drives its buckets: ``no_sync`` (all micro-batches but the last),
    ``start_grad_sync`` (``config.grad_sync_func``: pipeline stages, after the cooldown) and
    ``finish_grad_sync`` (``finalize_model_grads``) with ``--overlap-grad-reduce``;
    ``start_param_sync(force_sync=True)`` (``disable_forward_pre_hook`` / ``force_param_sync``:
    evaluation, checkpoints, the end of training) finishes every re-placement in flight.

    Wrapped on the instance, whatever DDP class wrapped the chunk: Megatron-LM calls these
    methods by name on the chunk (and ``disable_forward_pre_hook`` calls ``start_param_sync``)."""
    if not hasattr(chunk, "start_param_sync"):
        return  # not a DDP chunk (no data-parallel wrapper): nothing drives it
    if traffic.grad_reduce:
        no_sync, start_grad_sync, finish_grad_sync = chunk.no_sync, chunk.start_grad_sync, chunk.finish_grad_sync

        @contextlib.contextmanager
        def no_sync_with_experts():
            with no_sync(), traffic.no_sync():
                yield

        def start_grad_sync_with_experts(*args, **kwargs):
            start_grad_sync(*args, **kwargs)
            traffic.start_grad_sync()

        def finish_grad_sync_with_experts(*args, **kwargs):
            finish_grad_sync(*args, **kwargs)
            traffic.finish_grad_sync()

        chunk.no_sync = no_sync_with_experts
        chunk.start_grad_sync = start_grad_sync_with_experts
        chunk.finish_grad_sync = finish_grad_sync_with_experts
    start_param_sync = chunk.start_param_sync

    def start_param_sync_with_experts(*args, force_sync: bool = False, **kwargs):
        start_param_sync(*args, force_sync=force_sync, **kwargs)
        if force_sync:
            traffic.finish_param_sync()

    chunk.start_param_sync = start_param_sync_with_experts


def _flat_items(state: dict):
    """(key, value) of a nested state dict (Megatron passes the model's under ``"model"``)."""
    for key, value in state.items():
        if isinstance(value, dict):
            yield from _flat_items(value)
        else:
            yield key, value


class SwiftMoEChainedOptimizer(ChainedOptimizer):
    """Megatron's ``ChainedOptimizer`` whose last member is the expert optimizer.

    Two differences:

    * under fp16 an overflow in the expert gradients also backs off the dense optimizer's loss
      scale (Megatron's scaler only sees its own gradients);
    * a gradient norm that is not finite (it covers every expert shard, after the reduction, and
      every dense gradient) never reaches a step: with ``stop_on_nonfinite`` (Megatron's
      ``--check-for-nan-in-loss-and-grad``, the default) :class:`NonFiniteGradients` is raised on
      every rank, naming where the NaN or Inf is; without it the step is skipped, as a loss-scale
      overflow is (Megatron counts a skipped iteration). fp16 with dynamic loss scaling finds
      overflows in :meth:`prepare_grads` first, and skips.
    """

    stop_on_nonfinite = True
    _nonfinite = False

    @property
    def experts(self) -> SwiftMoEExpertOptimizer:
        return self.chained_optimizers[-1]

    @torch.no_grad()
    def get_grad_norm(self):
        grad_norm = super().get_grad_norm()
        self._nonfinite = grad_norm is not None and not math.isfinite(grad_norm)
        if self._nonfinite:  # the same norm on every rank: every rank is here
            where = describe_nonfinite_grads(self.experts.shards)
            if self.stop_on_nonfinite:
                raise NonFiniteGradients(where)
            if dist.get_rank() == 0:
                print(f"> SwiftMoE: grad norm {grad_norm}: {where}; step skipped "
                      "(--no-check-for-nan-in-loss-and-grad)", flush=True)
        return grad_norm

    @torch.no_grad()
    def step_with_ready_grads(self) -> bool:
        if self._nonfinite:
            self._nonfinite = False
            return False  # nothing stepped: a skipped iteration
        return super().step_with_ready_grads()

    @torch.no_grad()
    def prepare_grads(self) -> bool:
        found_inf = self.experts.prepare_grads()
        for optimizer in self.chained_optimizers[:-1]:
            scaler = getattr(optimizer, "grad_scaler", None)
            with _forced_overflow(scaler) if found_inf and scaler is not None else contextlib.nullcontext():
                found_inf |= optimizer.prepare_grads()
        return found_inf


@contextlib.contextmanager
def _forced_overflow(scaler):
    """Make ``scaler.update`` see an overflow (once), whatever its optimizer found."""
    update = scaler.update
    scaler.update = lambda found_inf: update(True)
    try:
        yield
    finally:
        scaler.update = update


def chain_with_experts(dense: MegatronOptimizer, config, model_chunks: list, timeout=None,
                       stop_on_nonfinite: bool = True) -> SwiftMoEChainedOptimizer:
    """Megatron's optimizer(s) for everything but the slots, plus the expert optimizer."""
    members = list(dense.chained_optimizers) if isinstance(dense, ChainedOptimizer) else [dense]
    experts = SwiftMoEExpertOptimizer(config, model_chunks, loss_scale_source=members[0], timeout=timeout)
    chained = SwiftMoEChainedOptimizer([*members, experts])
    chained.stop_on_nonfinite = stop_on_nonfinite
    return chained


