"""What a training run reports: per-layer expert load, Megatron-style log lines, metrics files.

:class:`MoELoadMonitor` hooks every MoE layer (SwiftMoE or stock) and counts, per iteration,
the routed pairs per expert, the pairs each rank computed, the pairs the router dropped
(capacity factor) and the token pairs sent to other ranks; with pipeline stages every rank
gets the figures of every stage's layers. :class:`MetricsWriter` writes one
JSON object per iteration (rank 0) and mirrors scalars to TensorBoard / W&B when asked.

JSONL keys (per iteration): ``iteration``, ``lm_loss``, ``aux_loss`` (load-balancing loss,
mean over MoE layers), ``z_loss``, ``lr``, ``grad_norm``, ``skipped``, ``loss_scale``,
``tokens_per_s``, ``iter_time_s``, ``time_forward_backward_s``, ``time_optimizer_s``,
``consumed_samples``, ``bytes_sent`` (this iteration, summed over ranks: ``dense_grad``,
``dense_param``, ``expert_grad``, ``expert_param``, ``tokens``), and ``layers``: one entry
per MoE layer (of all pipeline stages, in layer order) with ``tokens_per_expert`` [E] (global
routed pairs that were computed, i.e. after capacity drops), ``replicas_per_expert`` [E],
``tokens_per_rank`` [N] (pairs each data-parallel rank's experts computed), ``static_tokens_per_rank``
[N] (what static expert parallelism, E/N consecutive experts per rank, would have computed
for the same routing), ``dropped_tokens`` (pairs dropped over capacity), ``tokens_sent``
(pairs sent to another rank), and per micro-batch: ``microbatch_tokens_per_expert`` [M][E]
(global computed pairs of each micro-batch: a routing trace the split can be replayed on),
``realised_max_mean`` (mean over the micro-batches of max/mean of the pairs each rank
computed: what the split really gave; for a stock layer its static layout) and
``static_max_mean`` (the same for static expert parallelism on the same routing).
``bytes_sent`` also has ``expert_migration`` (FlexMoE-like re-plans) and
``migration_peak_bytes`` is the largest migration buffer of any rank; ``peak_memory_bytes`` the
largest peak of allocated device memory of any rank so far (CUDA; 0 on the CPU). Evaluation
iterations add ``valid_lm_loss``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_swiftmoe.core.layer import SwiftMoELayer


class MoELoadMonitor:
    """Counts expert load per MoE layer over the micro-batches of one iteration (training only).

    Args:
        layers: this rank's MoE layers.
        group: the ranks whose load is summed and listed per rank (the layers' data-parallel
            group); default: the world.
        pipeline_group: with pipeline stages, the ranks of the other stages (same data-parallel
            rank), whose layers' figures :meth:`collect` appends in stage order.
    """

    def __init__(self, layers: list, group: Optional[dist.ProcessGroup] = None,
                 pipeline_group: Optional[dist.ProcessGroup] = None):
        self.layers = layers
        self.group = group
        self.pipeline_group = pipeline_group
        self.num_ranks = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.reset()
        for index, layer in enumerate(layers):
            layer.router.register_forward_hook(self._router_hook(index))
            layer.register_forward_hook(self._layer_hook(index))

    def reset(self) -> None:
        num_experts = [layer.config.num_moe_experts for layer in self.layers]
        # Per layer: [E] routed pairs, computed pairs, dropped pairs, pairs sent off-rank (local).
        self.routed = [torch.zeros(e, dtype=torch.int64) for e in num_experts]
        # Per layer and micro-batch: [E] computed pairs (local), [N] pairs per rank (SwiftMoE's split).
        self.micro: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self.rank_totals: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self.computed = torch.zeros(len(self.layers), dtype=torch.int64)
        self.dropped = torch.zeros(len(self.layers), dtype=torch.int64)
        self.sent = torch.zeros(len(self.layers), dtype=torch.int64)

    def _router_hook(self, index: int):
        def hook(router, inputs, outputs) -> None:
            if not router.training:
                return
            routing_map = outputs[1]
            self.micro[index].append(routing_map.sum(0).cpu())
            self.routed[index] += self.micro[index][-1]
            # Every token picks top-k experts; the router's capacity drop removes some.
            self.dropped[index] += routing_map.shape[0] * router.topk - int(routing_map.sum())

        return hook

    def _layer_hook(self, index: int):
        def hook(layer, inputs, outputs) -> None:
            if not layer.training or not isinstance(layer, SwiftMoELayer):
                return
            dispatcher = layer.token_dispatcher
            # SwiftMoE drops over capacity after the router, in its dispatcher.
            dropped = dispatcher.last_dropped_per_expert.cpu()
            self.routed[index] -= dropped
            self.micro[index][-1] = self.micro[index][-1] - dropped
            self.rank_totals[index].append(dispatcher.last_rank_totals)
            self.dropped[index] += int(dropped.sum())
            self.computed[index] += int(dispatcher.last_tokens_per_slot.sum())
            self.sent[index] += sum(dispatcher.send_splits) - dispatcher.send_splits[self.rank]

        return hook

    def collect(self) -> list[dict[str, Any]]:
        """Global per-layer figures for the iteration just trained (collective); then reset."""
        figures = self._collect_stage() if self.layers else []  # a stage may have no MoE layer
        if self.pipeline_group is not None and dist.get_world_size(self.pipeline_group) > 1:
            stages: list[Any] = [None] * dist.get_world_size(self.pipeline_group)
            dist.all_gather_object(stages, figures, group=self.pipeline_group)
            figures = [layer for stage in stages for layer in stage]
        self.reset()
        return figures

    def _collect_stage(self) -> list[dict[str, Any]]:
        """This rank's layers' figures, summed over ``group`` (collective within it)."""
        device = next(self.layers[0].parameters()).device
        routed = torch.stack(self.routed).to(device)
        dist.all_reduce(routed, group=self.group)
        local = torch.stack([self.computed, self.dropped, self.sent], dim=1).to(device)
        gathered = local.new_empty(self.num_ranks * local.shape[0], local.shape[1])
        dist.all_gather_into_tensor(gathered, local, group=self.group)
        gathered = gathered.view(self.num_ranks, *local.shape).cpu()
        micro = torch.stack([torch.stack(m) if m else torch.zeros(0, len(r), dtype=torch.int64)
                             for m, r in zip(self.micro, self.routed)]).to(device)  # [L, M, E]
        dist.all_reduce(micro, group=self.group)
        micro = micro.cpu()
        figures = []
        for index, layer in enumerate(self.layers):
            tokens = routed[index].cpu()
            owner = torch.arange(tokens.numel()) // -(-tokens.numel() // self.num_ranks)
            static = torch.zeros(self.num_ranks, dtype=torch.int64).index_add_(0, owner, tokens)
            static_micro = torch.zeros(micro.shape[1], self.num_ranks, dtype=torch.int64)
            static_micro.index_add_(1, owner, micro[index])  # [M, N]
            realised = torch.stack(self.rank_totals[index]) if self.rank_totals[index] else static_micro
            if isinstance(layer, SwiftMoELayer):
                replicas = torch.bincount(layer.placement.flatten().cpu(), minlength=tokens.numel())
                per_rank = gathered[:, index, 0]
            else:
                replicas = torch.ones_like(tokens)
                per_rank = static
            figures.append(
                dict(
                    tokens_per_expert=tokens.tolist(),
                    replicas_per_expert=replicas.tolist(),
                    tokens_per_rank=per_rank.tolist(),
                    static_tokens_per_rank=static.tolist(),
                    dropped_tokens=int(gathered[:, index, 1].sum()),
                    tokens_sent=int(gathered[:, index, 2].sum()),
                    microbatch_tokens_per_expert=micro[index].tolist(),
                    realised_max_mean=_mean_imbalance(realised),
                    static_max_mean=_mean_imbalance(static_micro),
                )
            )
        return figures


def _mean_imbalance(loads: torch.Tensor) -> float:
    """Mean over rows of max/mean (1.0 for a row of zeros). loads: [M, N]; 1.0 if M = 0."""
    if loads.numel() == 0:
        return 1.0
    loads = loads.to(torch.float64)
    mean = loads.mean(1)
    return float(torch.where(mean > 0, loads.max(1).values / mean.clamp(min=1e-300), 1.0).mean())


def load_line(index: int, figures: dict[str, Any], hottest: int = 3) -> str:
    """One line per layer: realised rank load imbalance per micro-batch (vs. static EP on the
    same routing), hottest experts and their replicas."""
    tokens, replicas = figures["tokens_per_expert"], figures["replicas_per_expert"]
    top = sorted(range(len(tokens)), key=lambda e: -tokens[e])[:hottest]
    hot = ", ".join(f"e{e} {tokens[e]}->{replicas[e]}x" for e in top)
    return (
        f" moe layer {index:2d} | max/mean rank load per micro-batch: {figures['realised_max_mean']:.3f}"
        f" (static EP: {figures['static_max_mean']:.3f})"
        f" | hottest experts (pairs->replicas): {hot} | dropped: {figures['dropped_tokens']}"
    )


class MetricsWriter:
    """JSONL metrics (rank 0), plus TensorBoard and W&B scalars when configured."""

    def __init__(self, args, enabled: bool, resume: bool = False):
        self.enabled = enabled
        self.file = None
        self.tensorboard = None
        self.wandb = None
        if not enabled:
            return
        path = Path(args.metrics_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A resumed run continues its file; a new run starts a new one.
        self.file = open(path, "a" if resume else "w", encoding="utf-8")
        if args.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise SystemExit("--tensorboard-dir needs the tensorboard package: pip install tensorboard") from error
            self.tensorboard = SummaryWriter(log_dir=args.tensorboard_dir)
        if args.wandb_project:
            try:
                import wandb
            except ImportError as error:
                raise SystemExit("--wandb-project needs the wandb package: pip install wandb") from error
            self.wandb = wandb.init(
                project=args.wandb_project,
                name=args.wandb_exp_name,
                dir=args.wandb_save_dir,
                mode=os.environ.get("WANDB_MODE", "offline"),
                config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
            )

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "iteration"}
        if self.tensorboard:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, record["iteration"])
        if self.wandb:
            self.wandb.log(scalars, step=record["iteration"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()


class Progress:
    """A one-line progress bar with ETA on terminals; silent otherwise (log lines suffice)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.total, self.start = total, start
        self.enabled = enabled and sys.stderr.isatty()
        self.t0 = time.time()

    def update(self, iteration: int, loss: float) -> None:
        if not self.enabled:
            return
        done = iteration - self.start
        eta = (time.time() - self.t0) / max(done, 1) * (self.total - iteration)
        filled = int(30 * iteration / self.total)
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (30 - filled)}] {iteration}/{self.total} loss {loss:.3f} ETA {eta:5.0f}s"
        )
        sys.stderr.flush()

    def clear(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 80 + "\r")
