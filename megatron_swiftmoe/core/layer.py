"""SwiftMoE's MoE layer for Megatron-Core, and the spec helper that swaps it into a GPT spec.

``SwiftMoELayer`` is a ``MoELayer``: Megatron's ``TopKRouter`` (top-k, softmax/sigmoid,
aux loss, z-loss, expert bias) and ``MoELayer.forward`` run unchanged. Only the two pieces
that assume a static expert layout are replaced: the token dispatcher
(:class:`SwiftMoETokenDispatcher`) and the experts (:class:`SlotExperts`, S replica slots).

The layer owns the per-layer replication state: the current ``placement`` ``[N, S]`` (the
expert held by every slot of every rank) and ``step_popularity`` ``[E]`` (global routed
pairs per expert since the last optimizer step). :class:`SwiftMoEOptimizer` plans the next
placement from the popularity and writes the updated expert weights into the new slots.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import MoECudaGraphTensorStore, get_default_pg_collection
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_swiftmoe.core import placement as placement_lib
from megatron_swiftmoe.core.compat import default_device
from megatron_swiftmoe.core.config import SwiftMoEConfig
from megatron_swiftmoe.core.dispatcher import SwiftMoETokenDispatcher
from megatron_swiftmoe.core.experts import SlotExperts


def master_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """fp32 master weights, gradients and reductions for fp32/bf16/fp16 params (fp64 stays fp64)."""
    return torch.promote_types(param_dtype, torch.float32)


def plan_placement(popularity: torch.Tensor, num_ranks: int, swiftmoe: SwiftMoEConfig) -> torch.Tensor:
    """Replica counts (``swiftmoe.replica_counts``) and placement ``[N, S]`` (``swiftmoe.placement``)
    for ``popularity [E]``, planned on the host (one copy per layer and step), returned on its device."""
    slots = swiftmoe.slots_per_rank
    host = popularity.detach().cpu()
    if swiftmoe.replica_counts == "paper":
        counts = placement_lib.replica_counts(host, num_ranks * slots)
    else:
        counts = placement_lib.load_counts(host, num_ranks, slots)
    if swiftmoe.placement == "contiguous":
        layout = placement_lib.place_contiguous(counts, num_ranks, slots)
    else:
        layout = placement_lib.place(host, counts, num_ranks, slots)
    return layout.to(popularity.device)


def _check_supported(config: TransformerConfig, num_ranks: int, swiftmoe: SwiftMoEConfig) -> None:
    """Raise ValueError naming the setting SwiftMoE cannot run with."""
    placement_lib.check_layout(
        config.num_moe_experts, num_ranks, swiftmoe.slots_per_rank, config.moe_router_topk
    )
    unsupported = {
        "tensor_model_parallel_size": config.tensor_model_parallel_size != 1,
        "pipeline_model_parallel_size": config.pipeline_model_parallel_size != 1,
        "context_parallel_size": config.context_parallel_size != 1,
        "expert_model_parallel_size": config.expert_model_parallel_size != 1,
        "expert_tensor_parallel_size": (config.expert_tensor_parallel_size or 1) != 1,
        # SwiftMoE applies its own, replica-proportional capacity: SwiftMoEConfig.capacity_factor.
        "moe_expert_capacity_factor": config.moe_expert_capacity_factor is not None,
        "moe_apply_probs_on_input": config.moe_apply_probs_on_input,
        "moe_latent_size": bool(config.moe_latent_size),
        "moe_shared_expert_overlap": config.moe_shared_expert_overlap,
        "add_bias_linear": config.add_bias_linear,
    }
    bad = [name for name, is_bad in unsupported.items() if is_bad]
    if bad:
        raise ValueError(
            f"SwiftMoE does not support {', '.join(bad)} (got "
            + ", ".join(f"{name}={getattr(config, name)!r}" for name in bad)
            + "); SwiftMoE replicates bias-free experts across the data-parallel ranks; use the "
            "defaults (1 / None / False) for these settings (a capacity factor goes in "
            "SwiftMoEConfig.capacity_factor, which scales each expert's capacity with its replicas)"
        )


class SwiftMoELayer(MoELayer):
    """MoE layer with per-iteration expert replication over the data-parallel group.

    Args:
        config: Megatron's transformer config (experts, top-k, router, sizes).
        submodules: ``MoESubmodules``; ``router`` and ``shared_experts`` are used, ``experts``
            is ignored (slots replace it).
        layer_number: set by the transformer layer.
        pg_collection: Megatron process groups (router and shared experts use them).
        swiftmoe: SwiftMoE settings (slots per rank, placement policy, grouped GEMM).
        group: ranks that share the expert slots; defaults to the data-parallel group.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: Optional[MoESubmodules] = None,
        layer_number: Optional[int] = None,
        pg_collection=None,
        swiftmoe: Optional[SwiftMoEConfig] = None,
        group: Optional[dist.ProcessGroup] = None,
    ):
        self.swiftmoe = swiftmoe or SwiftMoEConfig()
        self.group = group or parallel_state.get_data_parallel_group()
        num_ranks = dist.get_world_size(self.group)
        _check_supported(config, num_ranks, self.swiftmoe)
        pg_collection = pg_collection or get_default_pg_collection()
        submodules = submodules or MoESubmodules()
        # MoELayer.__init__ would build the stock dispatcher and experts over an expert-parallel
        # group; set the attributes its methods read, with our dispatcher and slots instead.
        MegatronModule.__init__(self, config)
        self.config = config
        self.layer_number = layer_number
        self.ep_group = None  # experts are replicated over `group`, not partitioned
        self.attn_tp_group = pg_collection.tp
        self.num_local_experts = self.swiftmoe.slots_per_rank
        self.local_expert_indices = []  # change every iteration: see `slot_experts`
        self.use_shared_expert = config.moe_shared_expert_intermediate_size is not None
        self.shared_expert_overlap = config.moe_shared_expert_overlap
        self.shared_experts = None
        self.submodules = submodules
        self.moe_layer_recompute = (
            config.recompute_granularity == "selective"
            and "moe" in config.recompute_modules
            and config.cuda_graph_impl != "local"
        )
        self.shared_experts_recompute = (
            config.recompute_granularity == "selective" and "shared_experts" in config.recompute_modules
        )
        self.tp_group = pg_collection.tp
        self.cudagraph_tensor_store = MoECudaGraphTensorStore()
        self.fwd_execution_map = ["route", "expert_compute", "postprocess"]

        self.num_ranks = num_ranks
        self.rank = dist.get_rank(self.group)
        self.slots_per_rank = self.swiftmoe.slots_per_rank
        device = torch.device("cpu") if config.use_cpu_initialization else default_device()

        self.router = submodules.router(config=config, pg_collection=pg_collection)
        self.experts = SlotExperts(config, self.slots_per_rank, self.swiftmoe.grouped_gemm, device)
        if self.use_shared_expert:
            self.shared_experts = build_module(
                submodules.shared_experts,
                config=config,
                pg_collection=pg_collection,
                gate=config.moe_shared_expert_gate,
            )
        uniform = torch.zeros(config.num_moe_experts, dtype=torch.int64, device=device)
        self.register_buffer("placement", plan_placement(uniform, num_ranks, self.swiftmoe))
        # Persistent: with replan_interval > 1 it spans steps, and a resume must not lose it.
        self.register_buffer("step_popularity", uniform.clone())
        self.token_dispatcher = SwiftMoETokenDispatcher(self, config, pg_collection)
        # Full expert weights exist only until the optimizer takes its shards of them.
        self.initial_expert_weights: Optional[torch.Tensor] = None
        if config.perform_initialization:
            self.load_expert_weights(*self._init_expert_weights(device))

    @property
    def slot_experts(self) -> torch.Tensor:
        """Expert id held by each local slot, ``[S]``."""
        return self.placement[self.rank]

    @property
    def host_placement(self) -> torch.Tensor:
        """``placement`` on the host, copied once per change (the dispatcher plans on the host).

        Keyed on the buffer's storage and version, so ``set_placement``, ``load_state_dict``
        and moving the module all refresh it.
        """
        key = (self.placement.data_ptr(), self.placement._version)
        if getattr(self, "_host_placement_key", None) != key:
            self._host_placement = self.placement.cpu()
            self._host_placement_key = key
        return self._host_placement

    def _init_expert_weights(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Every expert initialised like a Megatron expert MLP (same on every rank)."""
        config = self.config
        num_experts = config.num_moe_experts
        dtype = master_dtype(config.params_dtype)
        fc1 = torch.empty(num_experts, *self.experts.fc1.shape[1:], dtype=dtype, device=device)
        fc2 = torch.empty(num_experts, *self.experts.fc2.shape[1:], dtype=dtype, device=device)
        for expert in range(num_experts):
            config.init_method(fc1[expert])
            config.output_layer_init_method(fc2[expert])
        return fc1, fc2

    @torch.no_grad()
    def load_expert_weights(self, fc1: torch.Tensor, fc2: torch.Tensor) -> None:
        """Set the weights of all experts (before the optimizer is built).

        fc1: ``[E, F1, H]``, fc2: ``[E, H, F]``, Megatron's ``linear_fc1`` / ``linear_fc2``
        layout. They fill the slots of the current placement and seed the optimizer's
        master shards.
        """
        expected = (self.config.num_moe_experts, *self.experts.fc1.shape[1:]), (
            self.config.num_moe_experts,
            *self.experts.fc2.shape[1:],
        )
        if (tuple(fc1.shape), tuple(fc2.shape)) != expected:
            raise ValueError(
                f"expert weights must have shapes {expected}, got {tuple(fc1.shape)} and {tuple(fc2.shape)}"
            )
        where = dict(dtype=master_dtype(self.config.params_dtype), device=self.experts.fc1.device)
        self.initial_expert_weights = self.experts.flat_slots(fc1.to(**where), fc2.to(**where))
        self.experts.load_flat(self.initial_expert_weights[self.slot_experts])

    def set_placement(self, placement: torch.Tensor) -> None:
        """Install the placement of the next iteration (its slot weights are written separately)."""
        self.placement.copy_(placement)


def swiftmoe_spec(spec, swiftmoe: SwiftMoEConfig):
    """Copy of a Megatron GPT layer or block spec with every ``MoELayer`` made a ``SwiftMoELayer``.

    ``spec`` is a layer ``ModuleSpec`` (e.g. ``get_gpt_layer_local_spec(num_experts=E)``) or a
    ``TransformerBlockSubmodules`` (``get_gpt_decoder_block_spec``, mixed dense/MoE layers).
    Router and shared-expert specs are kept.
    """
    spec = copy.deepcopy(spec)
    layer_specs = spec.layer_specs if isinstance(spec, TransformerBlockSubmodules) else [spec]
    found = False
    for layer_spec in layer_specs:
        mlp = layer_spec.submodules.mlp
        if isinstance(mlp, ModuleSpec) and isinstance(mlp.module, type) and issubclass(mlp.module, MoELayer):
            mlp.module = SwiftMoELayer
            mlp.params = {**(mlp.params or {}), "swiftmoe": swiftmoe}
            found = True
    if not found:
        raise ValueError("the spec has no MoE layer to replace: build it with num_experts set")
    return spec
