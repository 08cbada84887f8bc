"""``python -m megatron_swiftmoe.sim --trace METRICS.jsonl --cluster NAME``: per-strategy
modelled time per iteration, its parts and the bytes moved (see ``megatron_swiftmoe.sim``)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from megatron_swiftmoe.sim.cluster import cluster_names, get_cluster
from megatron_swiftmoe.sim.cost import STRATEGIES, calibrate_mfu, check_strategy, simulate
from megatron_swiftmoe.sim.model import MODEL_NAMES, load_model
from megatron_swiftmoe.sim.report import format_report
from megatron_swiftmoe.sim.trace import load_trace


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron_swiftmoe.sim",
        description="Model each MoE training strategy's iteration time on a cluster for a recorded routing "
                    "trace: what would SwiftMoE save on my cluster for this routing?",
    )
    p.add_argument("--trace", required=True, metavar="METRICS.jsonl",
                   help="metrics file written by pretrain_gpt --metrics-path (routing per iteration and layer)")
    p.add_argument("--cluster", default="paper-a100-16", metavar="NAME|FILE.yaml",
                   help=f"{', '.join(cluster_names())}, h100-<N> (N a multiple of 8) or a cluster YAML file "
                        "(default: %(default)s)")
    p.add_argument("--config", "--model", dest="model", default="gpt-small", metavar="NAME|FILE.yaml",
                   help=f"model shape: {', '.join(MODEL_NAMES)} or a training config YAML (default: %(default)s)")
    p.add_argument("--num-experts", type=int,
                   help="experts per MoE layer (default: the trace's; a different value is an error)")
    p.add_argument("--moe-router-topk", type=int, help="override the config's top-k")
    p.add_argument("--global-batch-size", type=int, help="override the config's global batch (sequences)")
    p.add_argument("--micro-batch-size", type=int, help="override the config's micro-batch size")
    p.add_argument("--slots-per-rank", type=int, help="override swiftmoe-slots-per-rank (SwiftMoE and FlexMoE)")
    p.add_argument("--strategies", default=",".join(STRATEGIES),
                   help="comma-separated: static, deepspeed, flexmoe-<K>, swiftmoe (default: %(default)s)")
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
                   help="SwiftMoE planning ms per MoE layer and iteration (default: measured on this CPU)")
    p.add_argument("--static-ep", type=int, default=None,
                   help="expert-parallel degree of static/deepspeed (default gcd(E, N)); E / S gives them "
                        "the same experts per GPU as SwiftMoE's S slots, with D = N S / E synchronised copies")
    p.add_argument("--json", action="store_true", help="print the full results as JSON")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
        for name in strategies:
            check_strategy(name)
        trace = load_trace(args.trace)
        cluster = get_cluster(args.cluster)
        model = load_model(
            args.model, num_experts=trace.num_experts if args.num_experts is None else args.num_experts,
            topk=args.moe_router_topk,
            global_batch_size=args.global_batch_size, micro_batch_size=args.micro_batch_size,
            slots_per_rank=args.slots_per_rank,
        )
        kwargs = dict(capacity_factor=args.capacity_factor, swiftmoe_capacity_factor=args.swiftmoe_capacity_factor,
                      planning_s=None if args.planning_ms is None else args.planning_ms / 1e3,
                      static_ep=args.static_ep)
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
