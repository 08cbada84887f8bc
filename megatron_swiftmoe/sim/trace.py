"""Routing traces: per-iteration, per-MoE-layer global tokens per expert from a metrics JSONL.

The file is what ``pretrain_gpt --metrics-path`` writes (format: ``megatron_swiftmoe.training.monitor``):
one JSON object per training iteration with ``layers[l].tokens_per_expert`` (global routed
(token, expert) pairs). Also kept: the recording's rank count (``len(tokens_per_rank)``), its
strategy (SwiftMoE if any expert had more than one replica), measured ``iter_time_s`` and the
optimizer's ``bytes_sent``. A resumed run appends to its file and repeats iterations after the
checkpoint; the last record of an iteration wins.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

__all__ = ["Trace", "load_trace"]


@dataclass(frozen=True)
class Trace:
    """``tokens``: int64 ``[I, L, E]`` routed pairs per iteration, MoE layer and expert."""

    tokens: torch.Tensor
    iterations: tuple[int, ...] = ()
    num_ranks: Optional[int] = None
    strategy: Optional[str] = None  # "swiftmoe" or "static" (as recorded), None if unknown
    iter_time_s: tuple[Optional[float], ...] = ()
    bytes_sent: tuple[dict, ...] = ()
    path: str = "<memory>"

    def __post_init__(self) -> None:
        if self.tokens.dim() != 3 or self.tokens.shape[0] == 0 or self.tokens.is_floating_point():
            raise ValueError(f"trace tokens must be a non-empty integer tensor [I, L, E], got "
                             f"{self.tokens.dtype} {tuple(self.tokens.shape)}")
        if bool((self.tokens < 0).any()):
            raise ValueError("trace tokens must be non-negative")

    @classmethod
    def from_tokens(cls, tokens: Sequence | torch.Tensor, **kwargs: Any) -> "Trace":
        """A trace from nested lists ``[I][L][E]`` (or ``[I][E]`` for one layer)."""
        t = torch.as_tensor(tokens, dtype=torch.int64)
        if t.dim() == 2:
            t = t[:, None, :]
        kwargs.setdefault("iterations", tuple(range(1, t.shape[0] + 1)))
        return cls(tokens=t, **kwargs)

    @property
    def num_iterations(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_layers(self) -> int:
        return self.tokens.shape[1]

    @property
    def num_experts(self) -> int:
        return self.tokens.shape[2]

    def summary(self) -> str:
        ranks = f", recorded on {self.num_ranks} ranks ({self.strategy})" if self.num_ranks else ""
        return (f"{self.path}: {self.num_iterations} iterations, {self.num_layers} MoE layers, "
                f"{self.num_experts} experts{ranks}")


def load_trace(path: str | Path) -> Trace:
    """Read a metrics JSONL file; ValueError naming the file and line for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such trace file (a metrics JSONL from pretrain_gpt --metrics-path)")
    records: dict[int, tuple[int, dict]] = {}
    with open(path, encoding="utf-8") as file:
        for lineno, line in enumerate(file, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not a JSON object ({error.msg}); expected one metrics record per "
                                 "line as written by pretrain_gpt --metrics-path") from None
            if not isinstance(record, dict) or "layers" not in record or "iteration" not in record:
                raise ValueError(f"{where}: not a metrics record (needs 'iteration' and 'layers' with "
                                 "tokens_per_expert per MoE layer)")
            layers = record["layers"]
            if not isinstance(layers, list) or not layers or not all(
                isinstance(l, dict) and isinstance(l.get("tokens_per_expert"), list) for l in layers
            ):
                raise ValueError(f"{where}: 'layers' must be a non-empty list of objects with tokens_per_expert")
            records[int(record["iteration"])] = (lineno, record)
    if not records:
        raise ValueError(f"{path}: empty trace (no metrics records)")

    rows, shape = [], None
    for iteration in sorted(records):
        lineno, record = records[iteration]
        row = [l["tokens_per_expert"] for l in record["layers"]]
        this = (len(row), tuple(len(r) for r in row))
        if shape is not None and this != shape:
            raise ValueError(f"{path}:{lineno}: {this[0]} layers x experts {list(this[1])} differs from the "
                             f"first record's {shape[0]} x {list(shape[1])}")
        if len(set(this[1])) != 1:
            raise ValueError(f"{path}:{lineno}: MoE layers have different expert counts {list(this[1])}")
        shape = this
        rows.append(row)
    try:
        tokens = torch.tensor(rows, dtype=torch.int64)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{path}: tokens_per_expert must hold integers ({error})") from None

    ordered = [records[i][1] for i in sorted(records)]
    first = ordered[0]["layers"][0]
    num_ranks = len(first["tokens_per_rank"]) if isinstance(first.get("tokens_per_rank"), list) else None
    replicated = any(
        any(r != 1 for r in layer.get("replicas_per_expert", [1])) for rec in ordered for layer in rec["layers"]
    )
    return Trace(
        tokens=tokens,
        iterations=tuple(sorted(records)),
        num_ranks=num_ranks,
        strategy=None if num_ranks is None else ("swiftmoe" if replicated else "static"),
        iter_time_s=tuple(rec.get("iter_time_s") for rec in ordered),
        bytes_sent=tuple(rec.get("bytes_sent") or {} for rec in ordered),
        path=str(path),
    )
