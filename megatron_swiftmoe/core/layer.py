"""SwiftMoE's MoE layer for Megatron-Core, and the spec helper that swaps it into a GPT spec.

``SwiftMoELayer`` is a ``MoELayer``: Megatron's ``TopKRouter`` (top-k, softmax/sigmoid,
aux loss, z-loss, expert bias) and ``MoELayer.forward`` run unchanged. Only the two pieces
that assume a static expert layout are replaced: the token dispatcher
(:class:`SwiftMoETokenDispatcher`) and the experts (:class:`SlotExperts`, S replica slots).

The layer owns the per-layer state:

* ``expert_shard`` ``[E, P/N]`` (fp32): this rank's shard ``r`` of every expert's flattened
  weights, the authoritative expert weights (model state, so a checkpoint loaded without its
  optimizer state keeps them). Rank ``r`` owns shard ``r`` for the whole run;
* ``placement`` ``[N, S]``: the expert held by every slot of every rank;
* ``step_popularity`` ``[E]``: global routed pairs per expert since the last re-plan;
* the slots themselves (:class:`SlotExperts`), a cache of the shards for the current
  placement, written by the optimizer and never checkpointed.

The optimizer (:class:`SwiftMoEOptimizer`, or the Megatron-LM plugin's) reduces the slot
gradients into the shards, steps AdamW on them, plans the next placement from the popularity
and writes the updated shards into the new slots.

Distributed checkpoints (``sharded_state_dict``) store the expert weights under the keys and
global shapes of Megatron's static ``SequentialMLP`` experts, each rank writing the rectangles
of the weight matrices its shard covers, so a checkpoint reshards to any number of ranks or
slots and converts to and from Megatron's static expert parallelism.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
from typing import Optional

import torch
import torch.distributed as dist

from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_swiftmoe.core import placement as placement_lib
from megatron_swiftmoe.core.compat import default_device
from megatron_swiftmoe.core.config import SwiftMoEConfig
from megatron_swiftmoe.core.dispatcher import SwiftMoETokenDispatcher
from megatron_swiftmoe.core.experts import SlotExperts
from megatron_swiftmoe.core.versions import check_megatron_core

check_megatron_core()


def master_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """fp32 master weights, gradients and reductions for fp32/bf16/fp16 params (fp64 stays fp64)."""
    return torch.promote_types(param_dtype, torch.float32)


def shard_numel(expert_numel: int, num_ranks: int) -> int:
    """Elements of one expert's shard: ``ceil(P / N)`` (the last shards are zero-padded)."""
    return -(-expert_numel // num_ranks)


def shard_rectangles(
    rank: int, shard_size: int, shapes: tuple[tuple[int, int], ...]
) -> list[tuple[int, int, int, tuple[int, int], tuple[int, int]]]:
    """The rectangles of each weight matrix that ``rank``'s flat shard covers.

    An expert is the concatenation of the row-major matrices ``shapes`` (fc1 ``[F1, H]``, fc2
    ``[H, F]``) flattened; shard ``rank`` is elements ``[rank * shard_size, (rank + 1) *
    shard_size)`` of it. Returns ``(matrix, lo, hi, (row0, row1), (col0, col1))`` per piece:
    columns ``[lo, hi)`` of the shard hold rows ``row0:row1`` x columns ``col0:col1`` of matrix
    ``matrix``. A contiguous range of a row-major matrix is at most three rectangles: the end of
    a row, whole rows, the start of a row.
    """
    start, end = rank * shard_size, (rank + 1) * shard_size
    pieces = []
    offset = 0
    for index, (rows, cols) in enumerate(shapes):
        a, b = max(start, offset) - offset, min(end, offset + rows * cols) - offset
        while a < b:
            row, col = divmod(a, cols)
            if col or b - a < cols:  # within one row
                stop = min(b, (row + 1) * cols)
                rect = (row, row + 1), (col, stop - row * cols)
            else:  # whole rows
                stop = a + (b - a) // cols * cols
                rect = (row, stop // cols), (0, cols)
            pieces.append((index, offset + a - start, offset + stop - start, *rect))
            a = stop
        offset += rows * cols
    return pieces


def plan_placement(popularity: torch.Tensor, num_ranks: int, swiftmoe: SwiftMoEConfig) -> torch.Tensor:
    """Replica counts (``swiftmoe.replica_counts``) and placement ``[N, S]`` (``swiftmoe.placement``)
    for ``popularity [E]``, planned with tensor operations on popularity's device."""
    slots = swiftmoe.slots_per_rank
    popularity = popularity.detach()
    if swiftmoe.replica_counts == "paper":
        counts = placement_lib.replica_counts(popularity, num_ranks * slots)
    else:
        counts = placement_lib.load_counts(popularity, num_ranks, slots)
    if swiftmoe.placement == "contiguous":
        return placement_lib.place_contiguous(counts, num_ranks, slots)
    return placement_lib.place(popularity, counts, num_ranks, slots)


def replica_group() -> dist.ProcessGroup:
    """The ranks that share a SwiftMoE layer's expert slots: this pipeline stage's tensor x
    context x data-parallel ranks (Megatron's MoE parallel folding with EP = ETP = 1: the same
    ranks, in the same order, as the expert-data-parallel group). Every tensor- and
    context-parallel rank routes its own slice of the tokens, so its peers are simply more
    sources of one all-to-all. Without tensor and context parallelism it is the data-parallel
    group (the same ranks: a position in it is the data-parallel rank)."""
    return parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)


def _check_supported(config: TransformerConfig, num_ranks: int, swiftmoe: SwiftMoEConfig) -> None:
    """Raise ValueError naming the setting SwiftMoE cannot run with."""
    placement_lib.check_layout(
        config.num_moe_experts, num_ranks, swiftmoe.slots_per_rank, config.moe_router_topk
    )
    unsupported = {
        "expert_model_parallel_size": config.expert_model_parallel_size != 1,
        "expert_tensor_parallel_size": (config.expert_tensor_parallel_size or 1) != 1,
        # SwiftMoE applies its own, replica-proportional capacity: SwiftMoEConfig.capacity_factor.
        "moe_expert_capacity_factor": config.moe_expert_capacity_factor is not None,
        "moe_apply_probs_on_input": config.moe_apply_probs_on_input,
        "moe_latent_size": bool(config.moe_latent_size),
        "add_bias_linear": config.add_bias_linear,
    }
    bad = [name for name, is_bad in unsupported.items() if is_bad]
    if bad:
        raise ValueError(
            f"SwiftMoE does not support {', '.join(bad)} (got "
            + ", ".join(f"{name}={getattr(config, name)!r}" for name in bad)
            + "); SwiftMoE replicates whole, bias-free experts across the tensor x context x "
            "data-parallel ranks; use the defaults (1 / None / False) for these settings (a "
            "capacity factor goes in SwiftMoEConfig.capacity_factor, which scales each expert's "
            "capacity with its replicas)"
        )


def _draw_expert_weights(config: TransformerConfig, fc1_shape, fc2_shape, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every expert initialised like a Megatron expert MLP (same on every rank): ``[E, *fc1_shape]``,
    ``[E, *fc2_shape]``.

    From the generator Megatron's own experts draw from, in the dtype they draw in: the default
    (CPU) one into fp32 master matrices with ``use_cpu_initialization``, else the expert-parallel
    RNG tracker stream into the parameters' dtype; then rounded to the parameters' dtype as
    theirs are. So building SwiftMoE layers leaves every other generator, and with it the dropout
    masks, where Megatron's static experts leave it. (The GPU path has not run on a GPU here.)
    """
    num_experts = config.num_moe_experts
    drawn = torch.float32 if config.use_cpu_initialization else config.params_dtype
    fc1 = torch.empty(num_experts, *fc1_shape, dtype=drawn, device=device)
    fc2 = torch.empty(num_experts, *fc2_shape, dtype=drawn, device=device)
    if config.use_cpu_initialization:
        stream = contextlib.nullcontext()
    else:
        stream = tensor_parallel.get_cuda_rng_tracker().fork(tensor_parallel.get_expert_parallel_rng_tracker_name())
    with stream:
        for expert in range(num_experts):
            config.init_method(fc1[expert])
            config.output_layer_init_method(fc2[expert])
    master = master_dtype(config.params_dtype)
    return fc1.to(config.params_dtype).to(master), fc2.to(config.params_dtype).to(master)


class _SlotsDrawingInitialWeights(SlotExperts):
    """The slots, which draw every expert's initial weights as soon as they are built.

    ``MoELayer.__init__`` builds the experts between the router and the shared experts; Megatron's
    static experts draw their weights there. Drawing at the same point (not after the layer is
    built) leaves the shared experts' initial weights what they are under static expert
    parallelism (with ``use_cpu_initialization`` both draw from the default generator).
    """

    def __init__(self, *args, initial_weights: list, **kwargs):
        super().__init__(*args, **kwargs)
        if self.config.perform_initialization:
            initial_weights.append(_draw_expert_weights(self.config, self.fc1.shape[1:], self.fc2.shape[1:], self.fc1.device))


class SwiftMoELayer(MoELayer):
    """MoE layer with per-iteration expert replication over the data-parallel group.

    Args:
        config: Megatron's transformer config (experts, top-k, router, sizes).
        submodules: ``MoESubmodules``; ``router`` and ``shared_experts`` are used, ``experts``
            is replaced by the slots.
        layer_number: set by the transformer layer.
        pg_collection: Megatron process groups (router and shared experts use them).
        swiftmoe: SwiftMoE settings (slots per rank, placement policy, grouped GEMM).
        group: ranks that share the expert slots; defaults to :func:`replica_group` (this
            pipeline stage's tensor x context x data-parallel ranks).
        **kwargs: what newer Megatron versions pass every MLP (``is_mtp_layer``, ``name``).
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: Optional[MoESubmodules] = None,
        layer_number: Optional[int] = None,
        pg_collection=None,
        swiftmoe: Optional[SwiftMoEConfig] = None,
        group: Optional[dist.ProcessGroup] = None,
        **kwargs,
    ):
        self.swiftmoe = swiftmoe or SwiftMoEConfig()
        self.group = group or replica_group()
        num_ranks = dist.get_world_size(self.group)
        _check_supported(config, num_ranks, self.swiftmoe)
        device = torch.device("cpu") if config.use_cpu_initialization else default_device()
        initial_weights = []
        slots = ModuleSpec(
            module=_SlotsDrawingInitialWeights,
            params=dict(num_slots=self.swiftmoe.slots_per_rank, grouped_gemm=self.swiftmoe.grouped_gemm, device=device,
                        initial_weights=initial_weights),
        )
        submodules = dataclasses.replace(submodules, experts=slots) if submodules else MoESubmodules(experts=slots)
        # MoELayer.__init__ builds router, shared experts and, from the spec, our slots. It also
        # builds a stock dispatcher of config.moe_token_dispatcher_type, replaced below: the
        # all-gather one is built because it needs neither CUDA streams nor DeepEP.
        dispatcher_type = config.moe_token_dispatcher_type
        config.moe_token_dispatcher_type = "allgather"
        try:
            super().__init__(config, submodules, layer_number, pg_collection, **kwargs)
        finally:
            config.moe_token_dispatcher_type = dispatcher_type
        pg_collection = pg_collection or get_default_pg_collection()
        self.num_ranks = num_ranks
        self.rank = dist.get_rank(self.group)
        # Ranks whose losses the expert gradients average over: data x context parallel, as
        # Megatron's DDP scales expert gradients (tensor-parallel peers hold slices of one loss).
        self.dp_cp_size = num_ranks // config.tensor_model_parallel_size
        self.slots_per_rank = self.num_local_experts = self.swiftmoe.slots_per_rank
        self.local_expert_indices = []  # they change every iteration: see `slot_experts`

        uniform = torch.zeros(config.num_moe_experts, dtype=torch.int64, device=device)
        self.register_buffer("placement", plan_placement(uniform, num_ranks, self.swiftmoe))
        # Persistent: with replan_interval > 1 it spans steps, and a resume must not lose it.
        self.register_buffer("step_popularity", uniform.clone())
        self.shard_numel = shard_numel(self.experts.expert_numel, num_ranks)
        # Not in state_dict(): every rank's differs, and each front end saves it its own way
        # (per-rank files, or sharded_state_dict below).
        shard = torch.zeros(config.num_moe_experts, self.shard_numel, dtype=master_dtype(config.params_dtype), device=device)
        self.register_buffer("expert_shard", shard, persistent=False)
        self.token_dispatcher = SwiftMoETokenDispatcher(self, config, pg_collection)
        if self.use_shared_expert and self.shared_expert_overlap:
            self.token_dispatcher.set_shared_experts(self.shared_experts)
        if initial_weights:
            self.load_expert_weights(*initial_weights.pop())

    @property
    def slot_experts(self) -> torch.Tensor:
        """Expert id held by each local slot, ``[S]``."""
        return self.placement[self.rank]

    @property
    def split_layout(self) -> tuple[placement_lib.SplitLayout, torch.Tensor]:
        """``(placement_lib.split_layout(placement), source_index for this rank)``, built once per
        placement (the dispatcher splits every micro-batch with it).

        Keyed on the buffer's storage and version, so ``set_placement``, ``load_state_dict``
        and moving the module all refresh it.
        """
        key = (self.placement.data_ptr(), self.placement._version, self.placement.device)
        if getattr(self, "_split_layout_key", None) != key:
            layout = placement_lib.split_layout(self.placement, self.config.num_moe_experts)
            rank = torch.tensor([self.rank], device=self.placement.device)
            self._split_layout = (layout, placement_lib.source_index(layout, rank))
            self._split_layout_key = key
        return self._split_layout

    @property
    def host_placement(self) -> torch.Tensor:
        """``placement`` on the host, copied once per change (the expert traffic's index
        bookkeeping runs on the host).

        Keyed on the buffer's storage and version, so ``set_placement``, ``load_state_dict``
        and moving the module all refresh it.
        """
        key = (self.placement.data_ptr(), self.placement._version)
        if getattr(self, "_host_placement_key", None) != key:
            self._host_placement = self.placement.cpu()
            self._host_placement_key = key
        return self._host_placement

    @torch.no_grad()
    def load_expert_weights(self, fc1: torch.Tensor, fc2: torch.Tensor) -> None:
        """Set the weights of all experts (the same on every rank; no communication).

        fc1: ``[E, F1, H]``, fc2: ``[E, H, F]``, Megatron's ``linear_fc1`` / ``linear_fc2``
        layout. They set this rank's expert shards and fill the slots of the current placement.
        """
        expected = (self.config.num_moe_experts, *self.experts.fc1.shape[1:]), (
            self.config.num_moe_experts,
            *self.experts.fc2.shape[1:],
        )
        if (tuple(fc1.shape), tuple(fc2.shape)) != expected:
            raise ValueError(
                f"expert weights must have shapes {expected}, got {tuple(fc1.shape)} and {tuple(fc2.shape)}"
            )
        flat = self.experts.flat_slots(fc1, fc2).to(self.expert_shard)
        start = self.rank * self.shard_numel
        mine = flat[:, start : start + self.shard_numel]
        self.expert_shard.zero_()[:, : mine.shape[1]] = mine
        self.experts.load_flat(flat[self.slot_experts])

    def set_placement(self, placement: torch.Tensor) -> None:
        """Install the placement of the next iteration (its slot weights are written separately).

        A placement planned on the host also becomes :attr:`host_placement`, so that nobody
        copies it back from the device (and its copy to the device does not wait for the stream)."""
        self.placement.copy_(placement, non_blocking=True)
        if placement.device.type == "cpu":
            self._host_placement = placement.clone()
            self._host_placement_key = (self.placement.data_ptr(), self.placement._version)

    def _apply(self, fn, recurse: bool = True):
        # Float16Module casts the model to bf16/fp16: the master shards move with it but keep
        # their dtype. A zero-size probe tells where ``fn`` sends tensors.
        shard = self._buffers.pop("expert_shard")
        try:
            super()._apply(fn, recurse)
        finally:
            device = fn(torch.empty(0, dtype=shard.dtype, device=shard.device)).device
            self._buffers["expert_shard"] = shard.to(device)
        return self

    # ---- distributed checkpoints (megatron.core.dist_checkpointing)

    def _expert_pieces(self, tensor: torch.Tensor, key_prefix: str, sharded_offsets: tuple) -> dict:
        """``tensor [E, shard]`` (expert shards or an Adam moment of them) as ShardedTensors of the
        static experts' ``linear_fc1`` / ``linear_fc2`` weights, one per rectangle it covers."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        shapes = (tuple(self.experts.fc1.shape[1:]), tuple(self.experts.fc2.shape[1:]))
        pieces = shard_rectangles(self.rank, self.shard_numel, shapes)
        num_experts = tensor.shape[0]
        out = {}
        for expert in range(num_experts):
            offsets = (*sharded_offsets, (len(sharded_offsets), expert, num_experts))
            for matrix, lo, hi, rows, cols in pieces:
                # Full-rank local shape (no prepended axes): irregular chunks must be, for DCP.
                local = (1,) * len(offsets) + (rows[1] - rows[0], cols[1] - cols[0])
                out[f"{key_prefix}e{expert}.{lo}-{hi}"] = ShardedTensor(
                    key=f"{self._checkpoint_prefix}experts.experts.linear_fc{matrix + 1}.weight",
                    data=tensor[expert, lo:hi].view(local),
                    dtype=tensor.dtype,
                    local_shape=local,
                    global_shape=(*(frags for _, _, frags in offsets), *shapes[matrix]),
                    global_offset=(*(off for _, off, _ in offsets), rows[0], cols[0]),
                    axis_fragmentations=None,  # shards cut matrices at arbitrary elements
                    replica_id=(0, 0, 0),  # every piece has exactly one owner
                )
        return out

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """Router / shared experts as Megatron saves them; experts in the static experts' format.

        The placement and popularity go in one replicated object (``swiftmoe_plan``), requested
        only from checkpoints written with SwiftMoE (``metadata["swiftmoe"]``); a static
        checkpoint leaves the current plan in place.
        """
        from megatron.core.transformer.utils import make_sharded_object_for_checkpoint, sharded_state_dict_default

        self._checkpoint_prefix = prefix  # the optimizer keys the Adam moments the same way
        state = {}
        for name, module in self.named_children():
            if module is not self.experts:
                state.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata))
        state.update(self._expert_pieces(self.expert_shard, f"{prefix}experts.swiftmoe_shard.", sharded_offsets))
        # The static experts' (empty) extra states, so that a static run can load this checkpoint.
        for expert in range(self.config.num_moe_experts):
            offsets = (*sharded_offsets, (len(sharded_offsets), expert, self.config.num_moe_experts))
            for fc in ("linear_fc1", "linear_fc2"):
                key = f"{prefix}experts.experts.{fc}._extra_state"
                state[f"{prefix}experts.swiftmoe_extra.{expert}.{fc}"] = make_sharded_object_for_checkpoint(
                    None, key, offsets, replica_id=(0, 0, self.rank)
                )
        if metadata is None or metadata.get("swiftmoe") is not None:
            plan = {"placement": self.placement.cpu(), "step_popularity": self.step_popularity.cpu()}
            state[f"{prefix}swiftmoe_plan"] = make_sharded_object_for_checkpoint(
                plan, f"{prefix}swiftmoe_plan", sharded_offsets, replica_id=(0, 0, self.rank)
            )
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """Also takes the entries of :meth:`sharded_state_dict` (a distributed checkpoint)."""
        pieces = [key for key in state_dict if key.startswith(f"{prefix}experts.swiftmoe_shard.")]
        with torch.no_grad():
            for key in pieces:
                expert, span = key[len(f"{prefix}experts.swiftmoe_shard.e") :].split(".")
                lo, hi = map(int, span.split("-"))
                self.expert_shard[int(expert), lo:hi] = state_dict.pop(key).reshape(-1)
        for key in [key for key in state_dict if key.startswith(f"{prefix}experts.swiftmoe_extra.")]:
            del state_dict[key]
        plan = state_dict.pop(f"{prefix}swiftmoe_plan", None)
        if plan is not None:
            placement = plan["placement"]
            if tuple(placement.shape) != tuple(self.placement.shape):
                # Saved with another number of ranks or slots: plan this layout afresh.
                placement = plan_placement(plan["step_popularity"], self.num_ranks, self.swiftmoe)
            state_dict[f"{prefix}placement"] = placement
            state_dict[f"{prefix}step_popularity"] = plan["step_popularity"]
        elif pieces:  # a static run's checkpoint: keep this run's plan
            state_dict.setdefault(f"{prefix}placement", self.placement)
            state_dict.setdefault(f"{prefix}step_popularity", self.step_popularity)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def swiftmoe_layers(modules) -> list[SwiftMoELayer]:
    """The SwiftMoE layers of ``modules`` (a module or model chunks), in order."""
    modules = [modules] if isinstance(modules, torch.nn.Module) else modules
    return [m for module in modules for m in module.modules() if isinstance(m, SwiftMoELayer)]


def _mlp_module(layer_spec) -> tuple[Optional[type], Optional[MoESubmodules]]:
    """(class, submodules) of a layer spec's MLP: a ``ModuleSpec`` up to megatron-core 0.17,
    a ``functools.partial`` builder from 0.18 on."""
    mlp = layer_spec.submodules.mlp
    if isinstance(mlp, ModuleSpec):
        return mlp.module, mlp.submodules
    if isinstance(mlp, functools.partial):
        return mlp.func, mlp.keywords.get("submodules")
    return None, None


def moe_submodules(layer_spec) -> MoESubmodules:
    """The ``MoESubmodules`` of a GPT layer spec built with ``num_experts`` (either generation)."""
    module, submodules = _mlp_module(layer_spec)
    if not (isinstance(module, type) and issubclass(module, MoELayer)):
        raise ValueError("the layer spec has no MoE layer: build it with num_experts set")
    return submodules


def has_moe_layer(spec) -> bool:
    """Whether a layer ``ModuleSpec`` or a ``TransformerBlockSubmodules`` has an MoE layer."""
    layer_specs = spec.layer_specs if isinstance(spec, TransformerBlockSubmodules) else [spec]
    return any(
        isinstance(module, type) and issubclass(module, MoELayer)
        for module, _ in map(_mlp_module, layer_specs)
    )


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
        module, _ = _mlp_module(layer_spec)
        if not (isinstance(module, type) and issubclass(module, MoELayer)):
            continue
        mlp = layer_spec.submodules.mlp
        if isinstance(mlp, ModuleSpec):
            mlp.module = SwiftMoELayer
            mlp.params = {**(mlp.params or {}), "swiftmoe": swiftmoe}
        else:
            layer_spec.submodules.mlp = functools.partial(SwiftMoELayer, *mlp.args, **{**mlp.keywords, "swiftmoe": swiftmoe})
        found = True
    if not found:
        raise ValueError("the spec has no MoE layer to replace: build it with num_experts set")
    return spec
