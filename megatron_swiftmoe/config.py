"""SwiftMoE settings: the one dataclass every SwiftMoE component is configured by.

Megatron's :class:`TransformerConfig` configures the model (experts, top-k, router, sizes);
this adds what the replication strategy needs on top of it.
"""

from __future__ import annotations

from dataclasses import dataclass

PLACEMENT_POLICIES = ("balanced", "contiguous")
GROUPED_GEMM_MODES = ("auto", "on", "off")


@dataclass
class SwiftMoEConfig:
    """Settings of the SwiftMoE replication strategy.

    Attributes:
        slots_per_rank: expert slots S per rank and MoE layer. Each slot holds one replica of
            one expert; N ranks give N*S slots, which must be >= num_moe_experts.
        placement: ``"balanced"`` packs replicas so that the expected per-rank load is even
            (longest-processing-time packing); ``"contiguous"`` is the paper's layout, where the
            replicas of one expert sit on consecutive slots.
        grouped_gemm: ``"on"`` computes all slots with one ``torch._grouped_mm``; ``"off"``
            loops over slots; ``"auto"`` uses the grouped GEMM on CUDA for bf16/fp16 and the
            loop elsewhere (the loop was measured faster on CPU).
    """

    slots_per_rank: int = 4
    placement: str = "balanced"
    grouped_gemm: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.slots_per_rank, int) or self.slots_per_rank < 1:
            raise ValueError(
                f"swiftmoe slots_per_rank must be an integer >= 1, got {self.slots_per_rank!r}"
            )
        if self.placement not in PLACEMENT_POLICIES:
            raise ValueError(
                f"swiftmoe placement must be one of {PLACEMENT_POLICIES}, got {self.placement!r}"
            )
        if self.grouped_gemm not in GROUPED_GEMM_MODES:
            raise ValueError(
                f"swiftmoe grouped_gemm must be one of {GROUPED_GEMM_MODES}, "
                f"got {self.grouped_gemm!r}"
            )
