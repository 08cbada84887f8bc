"""The CLI's text report for a :func:`megatron_swiftmoe.sim.simulate` result."""

from __future__ import annotations

from megatron_swiftmoe.sim.cluster import Cluster
from megatron_swiftmoe.sim.cost import PARTS
from megatron_swiftmoe.sim.model import ModelShape

__all__ = ["format_report"]

_PART_HEADS = {"expert": "expert", "a2a": "a2a", "dense": "dense", "dense_sync": "dsync",
               "expert_sync": "esync", "step": "step", "migration": "migr", "planning": "plan"}


def _fmt_gb(x: float) -> str:
    return f"{x / 1e9:.3f}"


def format_report(result: dict) -> str:
    """The two tables the CLI prints: time per iteration and its parts; traffic and balance."""
    cluster = Cluster(**result["cluster"])
    model = ModelShape(**{k: v for k, v in result["model"].items() if k not in ("expert_params", "dense_params")})
    t, s = result["trace"], result["settings"]
    plan = ("measured on this CPU: " if s["planning_measured"] else "given: ") + (
        f"{s['planning_s_per_layer'] * 1e3:.2f} ms/layer/iteration + "
        f"{s['rank_plan_s_per_layer_microbatch'] * 1e3:.2f} ms/layer/micro-batch")
    cf = s["capacity_factor"]
    swift_cf = f"capacity factor {s['swiftmoe_capacity_factor']}" if s["swiftmoe_capacity_factor"] else "dropless"
    lines = [
        f"trace   {t['path']}: {t['iterations']} iterations, {t['layers']} MoE layers, {t['experts']} experts"
        + (f", recorded on {t['recorded_ranks']} ranks ({t['recorded_strategy']})" if t["recorded_ranks"] else ""),
        f"cluster {cluster.summary()}",
        f"model   {model.summary()}",
        f"settings: MFU {s['mfu']:.3g}, capacity factor {cf if cf is not None else 'none'} (deepspeed, flexmoe), "
        f"swiftmoe {swift_cf}, "
        f"{s['micro_batches_per_rank']} micro-batch(es) per rank, SwiftMoE planning {plan}",
        *[f"note: {n}" for n in result["notes"]],
        "",
        "modelled time per iteration (ms; mean over the trace; no overlap between parts)",
    ]
    rows = result["strategies"]
    name_w = max(12, *(len(n) for n in rows))
    head = f"{'strategy':<{name_w}} {'total':>9}" + "".join(f" {_PART_HEADS[p]:>8}" for p in PARTS)
    head += f" {'vs static':>9} {'vs DS':>6}"
    lines += [head, "-" * len(head)]
    for name, r in rows.items():
        line = f"{name:<{name_w}} {r['time_ms']:9.2f}" + "".join(f" {r['parts_ms'][p]:8.2f}" for p in PARTS)
        for key, width in (("speedup_vs_static", 9), ("speedup_vs_deepspeed", 6)):
            value = r[key]
            line += f" {(f'{value:.2f}x' if value else '-'):>{width}}"
        lines.append(line)
    lines += ["", "bytes per iteration (GB) and load"]
    head = (f"{'strategy':<{name_w}} {'dense gr':>9} {'dense pa':>9} {'exp grad':>9} {'exp para':>9} {'tokens':>9} "
            f"{'migrate':>9} {'max/mean':>9} {'survival':>9} {'replans':>8} {'replan x':>9} {'mem GB':>7}")
    lines += [head, "-" * len(head)]
    for name, r in rows.items():
        b = r["bytes"]
        slow = f"{r['replan_slowdown']:.2f}" if r["replan_slowdown"] else "-"
        lines.append(
            f"{name:<{name_w}} {_fmt_gb(b['dense_grad']):>9} {_fmt_gb(b['dense_param']):>9} "
            f"{_fmt_gb(b['expert_grad']):>9} {_fmt_gb(b['expert_param']):>9} {_fmt_gb(b['tokens']):>9} "
            f"{_fmt_gb(b['migration']):>9} {r['load_imbalance']:9.2f} {r['survival'] * 100:8.1f}% "
            f"{r['replans']:8d} {slow:>9} {r['memory_gb']:7.2f}"
        )
    lines += [
        "",
        "parts: expert = busiest rank's expert FLOPs; a2a = 4 token all-to-alls + count exchange per micro-batch; "
        "dense = attention/embedding FLOPs; dsync/esync = optimizer gradient + parameter traffic (dense / experts); "
        "step = AdamW over owned shards; migr = FlexMoE state migration stalls; plan = SwiftMoE/FlexMoE planning.",
        "bytes: grads = reduced buffers, params = gathered buffers (a rank's own shard counted: the paper's S*N*G, "
        "S*N*W identity); tokens, migrate = off-rank bytes. max/mean = rank load imbalance (expert pairs); "
        "survival = routed pairs not dropped; replan x = re-plan iteration time / other iterations; "
        "mem = weights + grads + optimizer state per rank (no activations).",
    ]
    return "\n".join(lines)
