"""``python -m megatron_swiftmoe.sim``: modelled iteration time of MoE training strategies.

Three inputs (see ``megatron_swiftmoe.sim``):

* ``--trace METRICS.jsonl``: replay a recorded routing trace; every strategy, its parts, bytes.
* ``--workload NAME``: the same report for a synthetic workload (``megatron_swiftmoe.sim.workloads``).
* ``--workloads all|NAME,...``: the comparison tables, SwiftMoE against static dropless EP, for
  every (model in ``--models``, cluster in ``--clusters``, workload).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from megatron_swiftmoe.sim.cluster import cluster_names, get_cluster
from megatron_swiftmoe.sim.compare import CompareSettings, compare
from megatron_swiftmoe.sim.cost import (
    METADATA_SCHEMES, REPLACEMENT_ORDERS, STRATEGIES, calibrate_mfu, check_strategy, default_slots, simulate,
)
from megatron_swiftmoe.sim.model import BUILTIN_MODELS, load_model, model_names
from megatron_swiftmoe.sim.report import format_comparison, format_report, format_summary
from megatron_swiftmoe.sim.trace import load_trace
from megatron_swiftmoe.sim.workloads import WORKLOADS, make_workload

DEFAULT_MODELS = "mixtral-8x7b,qwen3-30b-a3b,deepseek-v3"
DEFAULT_CLUSTERS = "h100-64,h100-256,h100-1024"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron_swiftmoe.sim",
        description="Model each MoE training strategy's iteration time on a cluster, for a recorded routing trace "
                    "or synthetic imbalance workloads: what would SwiftMoE save on my cluster for this routing?",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", metavar="METRICS.jsonl",
                     help="metrics file written by pretrain_gpt --metrics-path (routing per iteration and layer)")
    src.add_argument("--workload", choices=WORKLOADS, help="one synthetic workload, reported like a trace")
    src.add_argument("--workloads", metavar="all|NAME,...",
                     help=f"comparison tables of SwiftMoE vs static EP for these workloads ({', '.join(WORKLOADS)})")
    p.add_argument("--cluster", default="paper-a100-16", metavar="NAME|FILE.yaml",
                   help=f"{', '.join(cluster_names())}, h100-<N> (N a multiple of 8) or a cluster YAML file "
                        "(default: %(default)s)")
    p.add_argument("--config", "--model", dest="model", default="gpt-small", metavar="NAME|FILE.yaml",
                   help=f"model shape: {', '.join(model_names())} or a training config YAML (default: %(default)s)")
    p.add_argument("--models", default=DEFAULT_MODELS, help="--workloads: comma-separated models (default: %(default)s)")
    p.add_argument("--clusters", default=DEFAULT_CLUSTERS,
                   help="--workloads: comma-separated clusters (default: %(default)s)")
    p.add_argument("--num-experts", type=int,
                   help="experts per MoE layer (default: the trace's; a different value is an error)")
    p.add_argument("--moe-router-topk", type=int, help="override the config's top-k")
    p.add_argument("--global-batch-size", type=int, help="override the config's global batch (sequences)")
    p.add_argument("--micro-batch-size", type=int, help="override the config's micro-batch size")
    p.add_argument("--micro-batches", type=int, default=None,
                   help="micro-batches per rank and iteration (sets the global batch; --workloads default 8)")
    p.add_argument("--slots-per-rank", type=int,
                   help="override swiftmoe-slots-per-rank (SwiftMoE and FlexMoE); built-in models and --workloads "
                        "default to ceil(2E / N), two slots per expert on average")
    p.add_argument("--strategies", default=",".join(STRATEGIES),
                   help="--trace/--workload: comma-separated: static, static-ep<K>, deepspeed, flexmoe-<K>, swiftmoe "
                        "(default: %(default)s)")
    p.add_argument("--mfu", type=float, default=0.4,
                   help="achieved fraction of peak FLOP/s in compute (default: %(default)s)")
    p.add_argument("--calibrate", action="store_true",
                   help="fit --mfu to the trace's measured iteration times (only for a trace recorded on this "
                        "cluster with this model)")
    p.add_argument("--capacity-factor", type=float, default=1.0,
                   help="DeepSpeed's and FlexMoE's capacity factor, as in the paper (default: %(default)s)")
    p.add_argument("--swiftmoe-capacity-factor", type=float, default=None,
                   help="capacity factor for SwiftMoE (default: dropless)")
    p.add_argument("--planning-ms", type=float, default=None,
                   help="SwiftMoE planning ms per MoE layer and iteration, no split cost (default: measured on this "
                        "CPU for the modelled N, E, S)")
    p.add_argument("--static-ep", type=int, default=None,
                   help="expert-parallel degree of static/deepspeed (default gcd(E, N)); E / S gives them "
                        "the same experts per GPU as SwiftMoE's S slots, with D = N S / E synchronised copies")
    p.add_argument("--no-overlap", dest="overlap", action="store_false",
                   help="model no overlap: every gradient and parameter transfer after backward (Megatron without "
                        "--overlap-grad-reduce / --overlap-param-gather)")
    p.add_argument("--overlap-slowdown", type=float, default=0.0,
                   help="extra compute seconds per second of communication hidden behind it (default: %(default)s)")
    p.add_argument("--metadata", choices=list(METADATA_SCHEMES), default="new",
                   help="SwiftMoE's per-micro-batch count exchange (default: %(default)s, the planning rewrite's)")
    p.add_argument("--replacement", choices=REPLACEMENT_ORDERS, default="all",
                   help="SwiftMoE re-placement after the step: all layers issued at once, or a one-layer chain "
                        "(default: %(default)s)")
    p.add_argument("--iterations", type=int, default=20, help="--workload(s): iterations (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="--workload(s): seed (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the full results as JSON")
    return p


def _names(text: str, known: Sequence[str], what: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if names == ["all"]:
        return list(known)
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise ValueError(f"unknown {what} {bad or text!r}: use 'all' or some of {', '.join(known)}")
    return names


def _options(args) -> dict:
    return dict(overlap=args.overlap, overlap_slowdown=args.overlap_slowdown, metadata=args.metadata,
                replacement=args.replacement)


def _table(args) -> int:
    settings = CompareSettings(
        micro_batches=args.micro_batches or 8, iterations=args.iterations, seed=args.seed, mfu=args.mfu,
        slots_per_rank=args.slots_per_rank, planning_ms=args.planning_ms, **_options(args))
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for model in models:
        load_model(model)  # fails early with the list of names
    clusters = [c.strip() for c in args.clusters.split(",") if c.strip()]
    for cluster in clusters:
        get_cluster(cluster)
    cells = compare(models, clusters, _names(args.workloads, WORKLOADS, "workloads"), settings)
    if args.json:
        print(json.dumps([{**{k: v for k, v in c.items() if k not in ("model", "cluster")},
                           "model": c["model"].name, "cluster": c["cluster"].name} for c in cells], indent=1))
        return 0
    line = (f"Modelled ms per iteration (mean of {settings.iterations} iterations), MFU {settings.mfu:g}, overlap "
            f"{'on' if settings.overlap else 'off'}, count exchange '{settings.metadata}', re-placement "
            f"'{settings.replacement}'. 'esync' = SwiftMoE's expert gradient + re-placement traffic, exposed/hidden "
            "ms; 'a2a Δ' = its token all-to-all + count exchange minus static's; 'plan' = its exposed planning + "
            "split; 'why': parts where SwiftMoE gains / loses against the users' static EP (ms).")
    print(format_comparison(cells, line))
    print()
    print(format_summary(cells))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.workloads:
            return _table(args)
        strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
        for name in strategies:
            check_strategy(name)
        cluster = get_cluster(args.cluster)
        if args.trace:
            trace = load_trace(args.trace)
            experts = trace.num_experts if args.num_experts is None else args.num_experts
        else:
            experts = args.num_experts
        model = load_model(
            args.model, num_experts=experts, topk=args.moe_router_topk,
            global_batch_size=args.global_batch_size, micro_batch_size=args.micro_batch_size,
            slots_per_rank=args.slots_per_rank,
        )
        if args.micro_batches:
            model = model.replace(global_batch_size=args.micro_batches * cluster.num_gpus * model.micro_batch_size)
        if args.model in BUILTIN_MODELS and args.slots_per_rank is None:
            model = model.replace(slots_per_rank=default_slots(model.num_experts, cluster.num_gpus))
        if not args.trace:
            trace = make_workload(args.workload, model.num_experts, model.topk, iterations=args.iterations,
                                  layers=min(8, model.num_moe_layers), seed=args.seed)
        kwargs = dict(capacity_factor=args.capacity_factor, swiftmoe_capacity_factor=args.swiftmoe_capacity_factor,
                      planning_s=None if args.planning_ms is None else args.planning_ms / 1e3,
                      static_ep=args.static_ep, **_options(args))
        mfu = calibrate_mfu(trace, cluster, model, **kwargs) if args.calibrate else args.mfu
        result = simulate(trace, cluster, model, strategies, mfu=mfu, **kwargs)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        if args.calibrate:
            print(f"calibrated MFU {mfu:.4f} from the trace's measured iteration times")
        print(format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
