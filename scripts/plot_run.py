"""Plot a run's metrics file: expert popularity vs. replica counts, and rank load vs. static EP.

    python scripts/plot_run.py runs/quickstart/metrics.jsonl --out runs/quickstart/swiftmoe.png

Reads the JSONL written by ``megatron_swiftmoe.pretrain_gpt`` (keys documented in
``megatron_swiftmoe/training/monitor.py``) and writes one PNG with, for one MoE layer:
  1. each expert's share of routed pairs per iteration (heat map),
  2. each expert's share of the replica slots per iteration (heat map; SwiftMoE follows 1.
     one iteration late, because the next placement is planned from this iteration's routing),
  3. max/mean rank load per iteration: measured vs. what static expert parallelism would have
     had on the same routing,
  4. the lm loss.
It also prints the mean rank imbalance of both and the ratio.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def load(path: Path) -> list[dict]:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise SystemExit(f"{path}: no records")
    return records


def imbalance(loads: np.ndarray) -> np.ndarray:
    """max/mean over ranks, per iteration. loads: [iterations, ranks]."""
    return loads.max(1) / np.maximum(loads.mean(1), 1e-9)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: next to the metrics)")
    parser.add_argument("--layer", type=int, default=0, help="MoE layer to show")
    args = parser.parse_args(argv)

    records = load(args.metrics)
    out = args.out or args.metrics.with_suffix(".png")
    iterations = np.array([r["iteration"] for r in records])
    layers = [r["layers"][args.layer] for r in records]
    tokens = np.array([layer["tokens_per_expert"] for layer in layers], dtype=float)
    replicas = np.array([layer["replicas_per_expert"] for layer in layers], dtype=float)
    measured = imbalance(np.array([layer["tokens_per_rank"] for layer in layers], dtype=float))
    static = imbalance(np.array([layer["static_tokens_per_rank"] for layer in layers], dtype=float))

    figure, axes = plt.subplots(4, 1, figsize=(10, 12), sharex=True)
    extent = (iterations[0] - 0.5, iterations[-1] + 0.5, -0.5, tokens.shape[1] - 0.5)
    for axis, values, title in (
        (axes[0], tokens / tokens.sum(1, keepdims=True), "share of routed (token, expert) pairs"),
        (axes[1], replicas / replicas.sum(1, keepdims=True), "share of replica slots"),
    ):
        image = axis.imshow(values.T, aspect="auto", origin="lower", extent=extent, cmap="viridis", interpolation="nearest")
        axis.set_ylabel("expert")
        axis.set_title(f"MoE layer {args.layer}: {title}")
        figure.colorbar(image, ax=axis, pad=0.01)
    axes[2].plot(iterations, static, label=f"static EP (same routing), mean {static.mean():.3f}", color="tab:red")
    axes[2].plot(iterations, measured, label=f"this run, mean {measured.mean():.3f}", color="tab:blue")
    axes[2].axhline(1.0, color="gray", linewidth=0.5)
    axes[2].set_ylabel("max / mean rank load")
    axes[2].legend()
    axes[3].plot(iterations, [r["lm_loss"] for r in records], label="train")
    valid = [(r["iteration"], r["valid_lm_loss"]) for r in records if "valid_lm_loss" in r]
    if valid:
        axes[3].plot(*zip(*valid), "o-", label="valid")
    axes[3].set_ylabel("lm loss")
    axes[3].set_xlabel("iteration")
    axes[3].legend()
    for axis in axes[2:]:
        axis.grid(alpha=0.3)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    print(f"layer {args.layer}: mean max/mean rank load {measured.mean():.3f} (static EP on the same routing: "
          f"{static.mean():.3f}, {static.mean() / measured.mean():.2f}x)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
