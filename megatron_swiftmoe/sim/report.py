"""The CLI's text: the per-strategy report of one trace, the comparison tables, and the
one-line explanation of why SwiftMoE wins or loses against a static baseline."""

from __future__ import annotations

from typing import Optional

from megatron_swiftmoe.sim.cluster import Cluster
from megatron_swiftmoe.sim.cost import PARTS
from megatron_swiftmoe.sim.model import ModelShape

__all__ = ["format_report", "format_comparison", "format_summary", "explain"]

_PART_HEADS = {"expert": "expert", "a2a": "a2a", "dense": "dense", "dense_sync": "dsync",
               "expert_sync": "esync", "step": "step", "migration": "migr", "planning": "plan"}
_PART_NAMES = {"expert": "expert compute", "a2a": "token all-to-all", "dense": "dense compute",
               "dense_sync": "exposed dense sync", "expert_sync": "exposed expert sync", "step": "optimizer step",
               "migration": "migration", "planning": "planning"}
_SHORT = {"expert": "balance", "a2a": "a2a", "dense": "dense", "dense_sync": "dsync", "expert_sync": "esync",
          "step": "step", "migration": "migr", "planning": "plan"}


def _fmt_gb(x: float) -> str:
    return f"{x / 1e9:.3f}"


def _deltas(base: dict, swift: dict) -> tuple[list, list]:
    """(gains, costs): (ms, part) where SwiftMoE's exposed part is smaller / larger than the
    baseline's by at least 0.5 % of the baseline's iteration, largest first."""
    threshold = 0.005 * base["time_ms"]
    deltas = [(swift["parts_ms"][p] - base["parts_ms"][p], p) for p in PARTS]
    gains = sorted(d for d in deltas if d[0] <= -threshold)
    costs = sorted((d for d in deltas if d[0] >= threshold), reverse=True)
    return gains, costs


def explain(base: dict, swift: dict, base_name: str = "static") -> str:
    """Why SwiftMoE's modelled iteration is faster or slower than ``base``'s, part by part."""
    ratio = base["time_ms"] / swift["time_ms"]
    gains, costs = _deltas(base, swift)

    def say(items: list) -> str:
        words = []
        for ms, part in items:
            word = f"{_PART_NAMES[part]} {ms:+.1f} ms"
            if part == "expert":
                word += f" (rank max/mean load {base['load_imbalance']:.2f} -> {swift['load_imbalance']:.2f})"
            words.append(word)
        return ", ".join(words)

    if ratio >= 1:
        head = f"SwiftMoE {ratio:.2f}x as fast as {base_name}"
        if not gains:
            return f"{head}: no part differs by 0.5 % of an iteration"
        return f"{head}: {say(gains)}" + (f" outweigh {say(costs)}" if costs else "")
    head = f"SwiftMoE slower than {base_name} ({ratio:.2f}x)"
    return f"{head} because {say(costs) or 'small differences'} " + (
        f"exceed the gains {say(gains)}" if gains else "and nothing is gained (routing already balanced)")


def _short(base: dict, swift: dict) -> str:
    gains, costs = _deltas(base, swift)
    g = ", ".join(f"{_SHORT[p]} {ms:+.0f}" for ms, p in gains[:2])
    c = ", ".join(f"{_SHORT[p]} {ms:+.0f}" for ms, p in costs[:3])
    if base["time_ms"] >= swift["time_ms"]:
        return f"wins: {g or '-'}" + (f" > {c}" if c else "")
    return f"loses: {c or '-'}" + (f" > {g}" if g else "")


def format_report(result: dict) -> str:
    """The CLI's report for one trace: time per iteration and its parts; traffic and balance."""
    cluster = Cluster(**result["cluster"])
    model = ModelShape(**{k: v for k, v in result["model"].items() if k not in ("expert_params", "dense_params")})
    t, s = result["trace"], result["settings"]
    plan = ("measured on this CPU (thread CPU time) by measure_planning for this run's " if s["planning_measured"]
            else "given: ")
    if s["planning_measured"]:
        plan += f"N={cluster.num_gpus}, E={model.num_experts}, S={model.slots_per_rank}: "
    plan += (f"{s['planning_s_per_layer'] * 1e3:.2f} ms per layer and step (placement) + "
             f"{s['rank_plan_s_per_layer_microbatch'] * 1e3:.2f} ms per layer and micro-batch (split)")
    cf = s["capacity_factor"]
    swift_cf = f"capacity factor {s['swiftmoe_capacity_factor']}" if s["swiftmoe_capacity_factor"] else "dropless"
    overlap = ("on (Megatron --overlap-grad-reduce / --overlap-param-gather, SwiftMoE per-layer expert gradients "
               f"and re-placement ({s['replacement']}), placement planned during backward)" if s["overlap"]
               else "off (every gradient and parameter transfer after backward)")
    if s["overlap"] and s["overlap_slowdown"]:
        overlap += f", compute slowed by {s['overlap_slowdown']:g} x hidden transfer time"
    meta = s["metadata_ms_per_layer_microbatch"]
    lines = [
        f"trace   {t['path']}: {t['iterations']} iterations, {t['layers']} MoE layers, {t['experts']} experts"
        + (f", recorded on {t['recorded_ranks']} ranks ({t['recorded_strategy']})" if t["recorded_ranks"] else ""),
        f"cluster {cluster.summary()}",
        f"model   {model.summary()}",
        f"settings: MFU {s['mfu']:.3g}, capacity factor {cf if cf is not None else 'none'} (deepspeed, flexmoe), "
        f"swiftmoe {swift_cf}, {s['micro_batches_per_rank']} micro-batch(es) per rank, static EP {s['static_ep']} "
        f"x {s['static_expert_copies']} expert-data-parallel copies",
        f"overlap: {overlap}",
        f"SwiftMoE planning: {plan}",
        f"count exchange per MoE layer and micro-batch: static {meta['static'] * 1e3:.0f} us, SwiftMoE "
        f"{meta['swiftmoe'] * 1e3:.0f} us (scheme '{s['metadata']}')",
        *[f"note: {n}" for n in result["notes"]],
        "",
        "modelled time per iteration (ms; mean over the trace): the parts are exposed time and sum to the total; "
        "'hidden' = communication / planning hidden behind compute",
    ]
    rows = result["strategies"]
    name_w = max(12, *(len(n) for n in rows))
    head = f"{'strategy':<{name_w}} {'total':>9}" + "".join(f" {_PART_HEADS[p]:>8}" for p in PARTS)
    head += f" {'hidden':>8} {'vs static':>9} {'vs DS':>6}"
    lines += [head, "-" * len(head)]
    for name, r in rows.items():
        line = f"{name:<{name_w}} {r['time_ms']:9.2f}" + "".join(f" {r['parts_ms'][p]:8.2f}" for p in PARTS)
        line += f" {sum(r['hidden_ms'].values()):8.2f}"
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
    if "swiftmoe" in rows:
        sw = rows["swiftmoe"]
        comm = sw["comm_ms"]
        lines += ["", "SwiftMoE expert traffic per iteration (ms): gradients to the shard owners "
                  f"{comm['expert_grad']['total']:.2f} ({comm['expert_grad']['exposed']:.2f} exposed), re-placement "
                  f"{comm['expert_param']['total']:.2f} ({comm['expert_param']['exposed']:.2f} exposed)"]
        for name in rows:
            if name.startswith(("static", "deepspeed")):
                lines.append(explain(rows[name], sw, name))
    lines += [
        "",
        "parts: expert = busiest rank's expert FLOPs; a2a = 4 token all-to-alls + count exchange per micro-batch; "
        "dense = attention/embedding FLOPs; dsync/esync = exposed optimizer gradient + parameter traffic (dense / "
        "experts); step = AdamW over owned shards; migr = FlexMoE state migration stalls; plan = SwiftMoE/FlexMoE "
        "planning (exposed) + SwiftMoE's per-micro-batch split.",
        "bytes: grads = reduced buffers, params = gathered buffers (a rank's own shard counted: the paper's S*N*G, "
        "S*N*W identity); tokens, migrate = off-rank bytes. max/mean = rank load imbalance (expert pairs); "
        "survival = routed pairs not dropped; replan x = re-plan iteration time / other iterations; "
        "mem = weights + grads + optimizer state per rank (no activations).",
    ]
    return "\n".join(lines)


def format_comparison(cells: list[dict], settings_line: Optional[str] = None) -> str:
    """Markdown tables, one per (model, cluster): static EP as users run it, static EP spread,
    SwiftMoE; ms per iteration, rank max/mean load, SwiftMoE's exposed and hidden expert traffic,
    its planning, and why it wins or loses."""
    lines = [settings_line] if settings_line else []
    for cell in cells:
        model, cluster = cell["model"], cell["cluster"]
        ep_u, ep_s, slots = cell["ep_users"], cell["ep_spread"], cell["slots"]
        first = next(iter(cell["rows"].values()))
        s = first["settings"]
        e = model.num_experts
        users, spread = f"static-ep{ep_u}", f"static-ep{ep_s}"
        mem = {k: v["memory_gb"] for k, v in first["strategies"].items()}
        lines += [
            "",
            f"### {model.name} on {cluster.name}",
            "",
            f"E={e} top-{model.topk}, {model.num_moe_layers} MoE layers; {s['micro_batches_per_rank']} micro-batches of "
            f"{model.micro_batch_size}x{model.seq_length} tokens per rank. Static EP{ep_u} (users: "
            f"{e // ep_u} experts/rank, {cluster.num_gpus // ep_u} copies)"
            + (f", spread EP{ep_s} ({e // ep_s} experts/rank, {cluster.num_gpus // ep_s} copies)" if ep_s != ep_u
               else " = spread")
            + f"; SwiftMoE S={slots} slots/rank over all {cluster.num_gpus} ranks. Weights+grads+optimizer per rank: "
            + ", ".join(f"{k} {v:.0f} GB" for k, v in mem.items())
            + f". Planning (this CPU, N={cluster.num_gpus}, E={e}, S={slots}): "
            f"{s['planning_s_per_layer'] * 1e3:.2f} ms/layer/step + {s['rank_plan_s_per_layer_microbatch'] * 1e3:.2f} "
            f"ms/layer/micro-batch split; counts exchange {s['metadata_ms_per_layer_microbatch']['swiftmoe'] * 1e3:.0f} "
            f"us/layer/micro-batch (static {s['metadata_ms_per_layer_microbatch']['static'] * 1e3:.0f} us).",
            "",
        ]
        head = ["workload", f"EP{ep_u} ms", "max/mean"]
        if ep_s != ep_u:
            head += [f"EP{ep_s} ms", "max/mean"]
        head += ["SwiftMoE ms", "max/mean", f"vs EP{ep_u}"] + ([f"vs EP{ep_s}"] if ep_s != ep_u else [])
        head += ["esync exposed/hidden", "a2a Δ", "plan", f"why (ms, vs EP{ep_u})"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, res in cell["rows"].items():
            r = res["strategies"]
            sw, u = r["swiftmoe"], r[users]
            row = [name, f"{u['time_ms']:.0f}", f"{u['load_imbalance']:.2f}"]
            if ep_s != ep_u:
                row += [f"{r[spread]['time_ms']:.0f}", f"{r[spread]['load_imbalance']:.2f}"]
            row += [f"{sw['time_ms']:.0f}", f"{sw['load_imbalance']:.2f}", f"{u['time_ms'] / sw['time_ms']:.2f}x"]
            if ep_s != ep_u:
                row.append(f"{r[spread]['time_ms'] / sw['time_ms']:.2f}x")
            row += [f"{sw['parts_ms']['expert_sync']:.0f}/{sw['hidden_ms']['expert_sync']:.0f}",
                    f"{sw['parts_ms']['a2a'] - u['parts_ms']['a2a']:+.0f}", f"{sw['parts_ms']['planning']:.0f}",
                    _short(u, sw)]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def format_summary(cells: list[dict]) -> str:
    """One markdown row per (model, cluster), one column per workload: SwiftMoE's speedup over
    static EP as users run it, and over static EP spread (when it differs)."""
    workloads = list(cells[0]["rows"]) if cells else []
    head = ["model", "cluster", "S", "EP users / spread"] + workloads
    lines = ["SwiftMoE speedup per iteration over static EP as users run it / over static EP spread "
             "(>1: SwiftMoE faster; one number when the two layouts coincide)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell in cells:
        ep_u, ep_s = cell["ep_users"], cell["ep_spread"]
        row = [cell["model"].name, cell["cluster"].name, str(cell["slots"]), f"{ep_u} / {ep_s}"]
        for name in workloads:
            r = cell["rows"][name]["strategies"]
            swift = r["swiftmoe"]["time_ms"]
            text = f"{r[f'static-ep{ep_u}']['time_ms'] / swift:.2f}"
            if ep_s != ep_u:
                text += f" / {r[f'static-ep{ep_s}']['time_ms'] / swift:.2f}"
            row.append(text)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
