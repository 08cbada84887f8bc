"""Plot a run's metrics file: expert popularity vs. replica counts, and rank load vs. static EP.

    python scripts/plot_run.py runs/quickstart/latest/metrics.jsonl --out runs/quickstart/latest/load.png

Reads the JSONL written by ``megatron_swiftmoe.pretrain_gpt`` (keys documented in
``megatron_swiftmoe/training/monitor.py``) and writes one PNG, titled with the run (strategy,
ranks, experts, slots), whose panels share one iteration axis:
  for each MoE layer shown (all of them, up to four, unless ``--layers`` chooses):
  1. each expert's share of routed pairs per iteration (heat map),
  2. each expert's replica count per iteration (heat map, one colour per count; SwiftMoE follows
     1. one iteration late, because the next placement is planned from this iteration's routing),
  then 3. max/mean rank load per iteration of every layer shown: measured (solid) vs. what static
  expert parallelism would have had on the same routing (dashed), and 4. the lm loss.
It also prints, per layer, the mean rank imbalance of both and the ratio.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import BoundaryNorm  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

DEFAULT_MAX_LAYERS = 4


def load(path: Path) -> list[dict]:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise SystemExit(f"{path}: no records")
    return records


def imbalance(loads: np.ndarray) -> np.ndarray:
    """max/mean over ranks, per iteration. loads: [iterations, ranks]."""
    return loads.max(1) / np.maximum(loads.mean(1), 1e-9)


def parse_layers(text: str | None, num_layers: int) -> tuple[list[int], str]:
    """The MoE layers to show and a note when some are left out."""
    if text is None:
        shown = list(range(min(num_layers, DEFAULT_MAX_LAYERS)))
    elif text == "all":
        shown = list(range(num_layers))
    else:
        try:
            shown = [int(part) for part in text.split(",")]
        except ValueError:
            raise SystemExit(f"--layers {text!r}: give MoE layer numbers such as 0,3 or 'all'") from None
    bad = [layer for layer in shown if not 0 <= layer < num_layers]
    if bad:
        raise SystemExit(f"--layers: the run has MoE layers 0..{num_layers - 1}, not {bad}")
    note = "" if len(shown) == num_layers else f" (choose others with --layers, e.g. --layers 0,{num_layers - 1} or all)"
    return shown, note


def describe_run(records: list[dict], title: str | None) -> str:
    """Strategy, ranks, experts and slots, from the records (the strategy from --title when given)."""
    first = records[0]["layers"][0]
    ranks, experts = len(first["tokens_per_rank"]), len(first["tokens_per_expert"])
    slots = sum(first["replicas_per_expert"]) / ranks
    replicated = any(set(r["layers"][0]["replicas_per_expert"]) != {1} for r in records)
    strategy = title or ("SwiftMoE" if replicated else
                         "one replica per expert (static expert parallelism, or SwiftMoE with ranks x slots = experts)")
    held = f"{slots:g} expert slots per rank" if replicated else f"{slots:g} experts per rank"
    return f"{strategy}: {ranks} ranks, {experts} experts, {held}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: next to the metrics)")
    parser.add_argument("--layers", default=None,
                        help=f"MoE layers to show: comma-separated numbers or 'all' (default: the first "
                        f"{DEFAULT_MAX_LAYERS}, which is all of them in most small runs)")
    parser.add_argument("--title", default=None, help="what the run is, e.g. 'quickstart, SwiftMoE' "
                        "(default: inferred from the replica counts)")
    args = parser.parse_args(argv)

    records = load(args.metrics)
    out = args.out or args.metrics.with_suffix(".png")
    num_layers = len(records[0]["layers"])
    shown, note = parse_layers(args.layers, num_layers)
    iterations = np.array([r["iteration"] for r in records])

    # Heat maps and lines in one column of equal widths (colour bars in a column of their own),
    # so that every panel's iteration axis lines up.
    rows = 2 * len(shown) + 2
    height = 2.3 * rows + 0.8
    figure = plt.figure(figsize=(11, height))
    grid = figure.add_gridspec(rows, 2, width_ratios=[60, 1], hspace=0.45, wspace=0.03, top=1 - 0.95 / height)
    axes = [figure.add_subplot(grid[0, 0])]
    axes += [figure.add_subplot(grid[row, 0], sharex=axes[0]) for row in range(1, rows)]
    extent = (iterations[0] - 0.5, iterations[-1] + 0.5)
    load_axis, loss_axis = axes[-2], axes[-1]
    summary = []
    for position, layer in enumerate(shown):
        figures = [r["layers"][layer] for r in records]
        tokens = np.array([f["tokens_per_expert"] for f in figures], dtype=float)
        replicas = np.array([f["replicas_per_expert"] for f in figures], dtype=int)
        experts = tokens.shape[1]
        share_axis, replica_axis = axes[2 * position], axes[2 * position + 1]
        image = share_axis.imshow(
            (tokens / np.maximum(tokens.sum(1, keepdims=True), 1)).T, aspect="auto", origin="lower",
            extent=(*extent, -0.5, experts - 0.5), cmap="viridis", interpolation="nearest")
        share_axis.set_title(f"MoE layer {layer}: share of routed (token, expert) pairs per expert", fontsize=10)
        figure.colorbar(image, cax=figure.add_subplot(grid[2 * position, 1]))
        low, high = int(replicas.min()), int(replicas.max())
        counts = np.arange(low, high + 1)
        norm = BoundaryNorm(np.append(counts, high + 1) - 0.5, len(counts))
        image = replica_axis.imshow(replicas.T, aspect="auto", origin="lower", extent=(*extent, -0.5, experts - 0.5),
                                    cmap=plt.get_cmap("viridis", len(counts)), norm=norm, interpolation="nearest")
        replica_axis.set_title(f"MoE layer {layer}: replicas per expert", fontsize=10)
        figure.colorbar(image, cax=figure.add_subplot(grid[2 * position + 1, 1]),
                        ticks=counts if len(counts) <= 8 else MaxNLocator(integer=True))
        for axis in (share_axis, replica_axis):
            axis.set_ylabel("expert")
            axis.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
        measured = imbalance(np.array([f["tokens_per_rank"] for f in figures], dtype=float))
        static = imbalance(np.array([f["static_tokens_per_rank"] for f in figures], dtype=float))
        color = plt.get_cmap("tab10")(position % 10)
        load_axis.plot(iterations, measured, color=color, label=f"layer {layer}: this run, mean {measured.mean():.3f}")
        load_axis.plot(iterations, static, color=color, linestyle="--", alpha=0.7,
                       label=f"layer {layer}: static EP (same routing), mean {static.mean():.3f}")
        summary.append((layer, measured.mean(), static.mean()))
    load_axis.axhline(1.0, color="gray", linewidth=0.5)
    load_axis.set_ylabel("max / mean rank load")
    load_axis.set_title("rank load per micro-batch, mean over the iteration's micro-batches", fontsize=10)
    load_axis.legend(fontsize=8, ncol=2 if len(shown) > 1 else 1)
    loss_axis.plot(iterations, [r["lm_loss"] for r in records], label="train")
    valid = [(r["iteration"], r["valid_lm_loss"]) for r in records if "valid_lm_loss" in r]
    if valid:
        loss_axis.plot(*zip(*valid), "o-", label="valid")
    loss_axis.set_ylabel("lm loss")
    loss_axis.set_xlabel("iteration")
    loss_axis.legend(fontsize=8)
    for axis in (load_axis, loss_axis):
        axis.grid(alpha=0.3)
        figure.add_subplot(grid[axes.index(axis), 1]).axis("off")  # keeps the column widths equal
    for axis in axes[:-1]:
        axis.tick_params(labelbottom=False)
    axes[0].set_xlim(*extent)
    layers_text = (f"MoE layer{'s' if len(shown) > 1 else ''} {', '.join(map(str, shown))} of {num_layers}{note}")
    figure.suptitle(f"{describe_run(records, args.title)}\n{layers_text}", fontsize=11, y=1 - 0.12 / height)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100, bbox_inches="tight")
    for layer, measured_mean, static_mean in summary:
        print(f"layer {layer}: mean max/mean rank load {measured_mean:.3f} (static EP on the same routing: "
              f"{static_mean:.3f}, {static_mean / measured_mean:.2f}x)")
    if note:
        print(f"showing MoE layers {shown} of {num_layers}{note}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
