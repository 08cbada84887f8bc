"""SwiftMoE settings: the one dataclass every SwiftMoE component is configured by.

Megatron's :class:`TransformerConfig` configures the model (experts, top-k, router, sizes);
this adds what the replication strategy needs on top of it. The ``--swiftmoe*`` command-line
flags that fill it are defined here too (:func:`add_swiftmoe_arguments`), once for both front
ends: this project's ``pretrain_gpt`` and the plugin for Megatron-LM's own ``pretrain_gpt.py``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional

PLACEMENT_POLICIES = ("balanced", "contiguous")
GROUPED_GEMM_MODES = ("auto", "on", "off")
DROP_POLICIES = ("probs", "position")
REPLICA_COUNT_RULES = ("load", "paper")
SPLIT_RULES = ("rank", "replica")


@dataclass
class SwiftMoEConfig:
    """Settings of the SwiftMoE replication strategy.

    Attributes:
        slots_per_rank: expert slots S per rank and MoE layer. Each slot holds one replica of
            one expert; N ranks give N*S slots, which must be >= num_moe_experts.
        placement: ``"balanced"`` packs replicas so that the expected per-rank load is even
            (longest-processing-time packing); ``"contiguous"`` is the paper's layout, where the
            replicas of one expert sit on consecutive slots.
        grouped_gemm: the slots' kernel (``core/experts.py``, :func:`select_slot_kernel`):
            ``"auto"`` the fastest that works here (Transformer Engine's grouped GEMM,
            ``torch._grouped_mm`` or a loop over slots; the loop on CPU, where it was measured
            faster); ``"on"`` a grouped kernel or an error; ``"off"`` the loop.
        capacity_factor: ``None`` is dropless (SwiftMoE's default). Otherwise every replica
            slot takes at most ``cf * k * T / (N * S)`` of a rank's ``T`` tokens, so expert e
            takes ``ceil(cf * k * T * r_e / (N * S))`` from each rank, ``r_e`` its replicas: with
            one slot per expert this is Megatron's (and DeepSpeed's) per-expert capacity. Pairs
            over capacity are dropped (the paper ran SwiftMoE with capacity factor 1.0).
        drop_policy: which pairs go over capacity: the lowest router probabilities
            (``"probs"``) or the last tokens of the batch (``"position"``), as in Megatron.
        replan_interval: re-plan the placement every this many optimizer steps from the
            popularity since the last re-plan. 1 is SwiftMoE. K > 1 models FlexMoE-like periodic
            re-balancing: between re-plans the replicas stay; at a re-plan the moved experts'
            parameters and full optimizer state are transferred to their new ranks, as a system
            whose optimizer state lives with the replicas must (see ``SwiftMoEOptimizer``).
        replica_counts: how many slots each expert gets. ``"load"`` (default) minimises the
            largest popularity / replicas, with at most one replica per rank until every expert
            is on every rank (``placement.load_counts``); ``"paper"`` is the paper's rule,
            replicas proportional to popularity (``placement.replica_counts``).
        split: how an expert's pairs of a micro-batch are divided among its replicas.
            ``"rank"`` (default) balances the rank totals (``placement.rank_quota``: a few rounds
            of diffusion from the equal split, near the exact min-max, not exact), treating an
            expert's slots on one rank as one pool; ``"replica"`` gives every replica the same
            share, as the paper (``placement.replica_quota``). Both then keep each rank's own
            pairs local where its quota allows.
    """

    slots_per_rank: int = 4
    placement: str = "balanced"
    grouped_gemm: str = "auto"
    capacity_factor: Optional[float] = None
    drop_policy: str = "probs"
    replan_interval: int = 1
    replica_counts: str = "load"
    split: str = "rank"

    def __post_init__(self) -> None:
        if not isinstance(self.slots_per_rank, int) or self.slots_per_rank < 1:
            raise ValueError(
                f"swiftmoe slots_per_rank must be an integer >= 1, got {self.slots_per_rank!r}"
            )
        if self.placement not in PLACEMENT_POLICIES:
            raise ValueError(
                f"swiftmoe placement must be one of {PLACEMENT_POLICIES}, got {self.placement!r}"
            )
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"swiftmoe capacity_factor must be > 0 (or None: dropless), got {self.capacity_factor!r}")
        if self.drop_policy not in DROP_POLICIES:
            raise ValueError(f"swiftmoe drop_policy must be one of {DROP_POLICIES}, got {self.drop_policy!r}")
        if not isinstance(self.replan_interval, int) or self.replan_interval < 1:
            raise ValueError(f"swiftmoe replan_interval must be an integer >= 1, got {self.replan_interval!r}")
        if self.replica_counts not in REPLICA_COUNT_RULES:
            raise ValueError(
                f"swiftmoe replica_counts must be one of {REPLICA_COUNT_RULES}, got {self.replica_counts!r}"
            )
        if self.split not in SPLIT_RULES:
            raise ValueError(f"swiftmoe split must be one of {SPLIT_RULES}, got {self.split!r}")
        if self.grouped_gemm not in GROUPED_GEMM_MODES:
            raise ValueError(
                f"swiftmoe grouped_gemm must be one of {GROUPED_GEMM_MODES}, "
                f"got {self.grouped_gemm!r}"
            )


def add_swiftmoe_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``--swiftmoe*`` flag group to ``parser`` (Megatron-LM's or ours); returns it."""
    g = parser.add_argument_group("SwiftMoE: per-iteration expert replication")
    g.add_argument(
        "--swiftmoe", action=argparse.BooleanOptionalAction, default=False,
        help="Use SwiftMoE: every MoE layer holds --swiftmoe-slots-per-rank expert replicas per "
        "rank, re-planned every iteration from the observed expert popularity; the experts' "
        "optimizer state is statically sharded and never moves. Without it (--no-swiftmoe) "
        "Megatron's static expert parallelism trains the same model: the baseline.",
    )
    g.add_argument(
        "--swiftmoe-slots-per-rank", type=int, default=4,
        help="Expert slots S per rank and MoE layer (each holds one replica of one expert); "
        "data-parallel size * S must be >= num-experts, and the spare slots replicate popular "
        "experts. 4 is the paper's setting.",
    )
    g.add_argument(
        "--swiftmoe-placement", choices=list(PLACEMENT_POLICIES), default="balanced",
        help="Placement of the replicas: balanced packs them so that every rank expects the same "
        "load; contiguous puts the replicas of an expert on consecutive slots (the paper's layout).",
    )
    g.add_argument(
        "--swiftmoe-grouped-gemm", choices=list(GROUPED_GEMM_MODES), default="auto",
        help="Expert computation: auto = the fastest kernel that works on this device and dtype "
        "(on CUDA in bf16/fp16: Transformer Engine's grouped GEMM where installed, else torch._grouped_mm "
        "on GPUs it has fast kernels for; a loop over the slots otherwise); on = a grouped kernel or stop "
        "with an error saying why none runs here; off = the loop. The kernel is reported at start-up.",
    )
    g.add_argument(
        "--swiftmoe-replan-interval", type=int, default=1,
        help="Re-plan the replicas every K iterations from the popularity since the last re-plan. "
        "1 (default) is SwiftMoE. K > 1 is the FlexMoE-like baseline: replicas stay fixed between "
        "re-plans, and at a re-plan the moved experts' parameters and optimizer state are "
        "transferred (bytes counted in the metrics as expert_migration). With "
        "--moe-expert-capacity-factor each expert's capacity is proportional to its replicas.",
    )
    g.add_argument(
        "--swiftmoe-replica-counts", choices=list(REPLICA_COUNT_RULES), default="load",
        help="Replicas per expert: load (default) minimises the largest popularity per replica, "
        "one replica per rank until every expert is on every rank; paper: proportional to "
        "popularity, the paper's rule.",
    )
    g.add_argument(
        "--swiftmoe-split", choices=list(SPLIT_RULES), default="rank",
        help="How each micro-batch's pairs of an expert are divided among its replicas: rank "
        "(default) balances the rank totals (near the smallest possible largest total), then keeps "
        "pairs on their source rank where it can; replica: an equal share per replica, the paper's rule.",
    )
    return parser


_FROM_FLAGS = object()


def swiftmoe_config_from_args(args: argparse.Namespace, capacity_factor=_FROM_FLAGS) -> Optional[SwiftMoEConfig]:
    """SwiftMoE's settings from parsed flags, or ``None`` without ``--swiftmoe``.

    ``--moe-expert-capacity-factor`` and ``--moe-token-drop-policy`` are Megatron's flags; with
    ``--swiftmoe`` they configure SwiftMoE's replica-proportional capacity (``capacity_factor``
    overrides the first, for a front end that has taken it away from Megatron's own layers).
    """
    if not args.swiftmoe:
        return None
    return SwiftMoEConfig(
        slots_per_rank=args.swiftmoe_slots_per_rank,
        placement=args.swiftmoe_placement,
        grouped_gemm=args.swiftmoe_grouped_gemm,
        capacity_factor=args.moe_expert_capacity_factor if capacity_factor is _FROM_FLAGS else capacity_factor,
        drop_policy=args.moe_token_drop_policy or "probs",
        replan_interval=args.swiftmoe_replan_interval,
        replica_counts=args.swiftmoe_replica_counts,
        split=args.swiftmoe_split,
    )
