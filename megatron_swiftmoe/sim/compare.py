"""SwiftMoE against Megatron's static dropless expert parallelism on public MoE shapes.

:func:`compare` models, for every (model, cluster, workload), one iteration of

* static EP as Megatron users run it (:func:`users_ep`): EP kept inside one node, as the
  Megatron-Core MoE guide recommends ("Guideline 2: keep EP and TP communication within the
  NVLink domain ... when scaling beyond one node, prefer PP over expanding TP/EP across nodes"),
  unless the model's public recipe spans nodes (DeepSeek-V3: EP 64 over 8 nodes); the other
  ranks hold expert-data-parallel copies (Megatron's MoE parallel folding);
* static EP with the experts spread as far as they go (EP = gcd(E, N): EP = N when N divides
  E, else EP = E and N / E copies of each expert);
* SwiftMoE over all N ranks (its replica group is TP x CP x DP of the stage), with S slots per
  rank (:func:`megatron_swiftmoe.sim.cost.default_slots`: two per expert on average, unless given).

Pipeline and tensor parallelism are not modelled: every rank runs every layer (data parallel
for dense parameters), which no real run of DeepSeek-V3 could fit in memory (the memory column
says so). Batches are weak-scaled: ``micro_batches`` micro-batches of 1 x 4096 tokens per rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from megatron_swiftmoe.sim.cluster import Cluster, get_cluster
from megatron_swiftmoe.sim.cost import default_slots, simulate
from megatron_swiftmoe.sim.model import ModelShape, load_model
from megatron_swiftmoe.sim.workloads import make_workload

__all__ = ["CompareSettings", "compare", "users_ep", "spread_ep", "configure"]


def users_ep(model: ModelShape, cluster: Cluster) -> int:
    """The EP degree Megatron users run: the model's recipe EP if it has one, else one node's GPUs
    (capped to what divides E and N)."""
    want = model.recipe_expert_parallel or cluster.gpus_per_node
    return math.gcd(math.gcd(model.num_experts, cluster.num_gpus), want)


def spread_ep(model: ModelShape, cluster: Cluster) -> int:
    return math.gcd(model.num_experts, cluster.num_gpus)


@dataclass
class CompareSettings:
    micro_batches: int = 8  # per rank and iteration, of micro_batch_size x seq_length tokens
    iterations: int = 20
    layers: int = 8  # distinct layer patterns per workload; model layers replay them in turn
    seed: int = 0
    mfu: float = 0.4
    overlap: bool = True
    overlap_slowdown: float = 0.0
    metadata: str = "new"
    replacement: str = "all"
    slots_per_rank: Optional[int] = None
    planning_ms: Optional[float] = None


def configure(model: ModelShape, cluster: Cluster, settings: CompareSettings) -> ModelShape:
    """The model with the comparison's batch (``micro_batches`` per rank) and slots per rank."""
    slots = settings.slots_per_rank or default_slots(model.num_experts, cluster.num_gpus)
    batch = settings.micro_batches * cluster.num_gpus * model.micro_batch_size
    return model.replace(slots_per_rank=slots, global_batch_size=batch)


def compare(models: Sequence[str], clusters: Sequence[str], workloads: Sequence[str],
            settings: Optional[CompareSettings] = None) -> list[dict]:
    """One entry per (model, cluster): ``model``, ``cluster``, ``slots``, ``ep_users``,
    ``ep_spread`` and ``rows`` (per workload: the :func:`simulate` result)."""
    settings = settings or CompareSettings()
    out = []
    for model_name in models:
        base = load_model(model_name)
        for cluster_name in clusters:
            cluster = get_cluster(cluster_name)
            model = configure(base, cluster, settings)
            ep_u, ep_s = users_ep(model, cluster), spread_ep(model, cluster)
            strategies = [f"static-ep{ep_u}"] + ([f"static-ep{ep_s}"] if ep_s != ep_u else []) + ["swiftmoe"]
            rows = {}
            for name in workloads:
                trace = make_workload(name, model.num_experts, model.topk, iterations=settings.iterations,
                                      layers=min(settings.layers, model.num_moe_layers), seed=settings.seed)
                rows[name] = simulate(
                    trace, cluster, model, strategies, mfu=settings.mfu,
                    planning_s=None if settings.planning_ms is None else settings.planning_ms / 1e3,
                    overlap=settings.overlap, overlap_slowdown=settings.overlap_slowdown,
                    metadata=settings.metadata, replacement=settings.replacement)
            out.append(dict(model=model, cluster=cluster, slots=model.slots_per_rank, ep_users=ep_u,
                            ep_spread=ep_s, rows=rows))
    return out
