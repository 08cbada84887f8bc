"""Reproduce the shape of the SwiftMoE paper's time-to-target-loss table (arXiv 2504.19925, GPT-Small).

What it does
    Trains the same GPT-MoE with every strategy of the paper's comparison -- same program, same
    seed, same data order, same initial weights -- records each run's loss curve, token survival
    and routing trace (the metrics JSONL), and makes the paper's table: iterations to a common
    target loss, tokens dropped, time per iteration and minutes to target, and the speedups vs
    DeepSpeed and vs the best FlexMoE.

    strategy            training flags (on top of the common ones)
    megatron            --no-swiftmoe                                  static EP, dropless
    deepspeed           --no-swiftmoe --moe-expert-capacity-factor 1.0 static EP, capacity 1.0, drops
    flexmoe-K           --swiftmoe --swiftmoe-replan-interval K --moe-expert-capacity-factor 1.0
                        (replicas re-planned every K iterations, moved experts' state migrated)
    swiftmoe            --swiftmoe --moe-expert-capacity-factor 1.0    the paper's SwiftMoE setting
    swiftmoe-dropless   --swiftmoe                                     this project's default

    Default scale (2 CPU ranks; about 15 min of training on a 2-core machine): the paper's model family shrunk
    -- 2 layers, hidden 64, ffn 256, 4 heads, 16 experts top-1 (pre-softmax), aux-loss coefficient
    1e-5, sequence 128, global batch 16 (micro-batch 4 x 2 ranks x 2 micro-batches), no dropout,
    AdamW (beta2 0.95, wd 0.1), lr 1e-3 cosine to 1e-4, 500 iterations, seed 1234, the built-in
    corpus (Python stdlib sources, 8192-piece SentencePiece). SwiftMoE/FlexMoE get S = 32 slots
    per rank: N*S = 64 = 4E, the paper's ratio (16 GPUs x 4 slots for 16 experts), so a hot
    expert can get up to 64 - 15 = 49 replicas exactly as in the paper.

How the table is computed (all from the metrics files; ``build_table`` needs no training)
    * smoothed loss: trailing moving average of the training lm loss over --smooth-window
      iterations (default 25; fewer at the start): smoothed[i] = mean(loss[max(0, i-W+1) .. i]).
    * target loss (the paper's way: one value every strategy reaches): the largest, over the
      successful runs, of each run's minimum smoothed loss, rounded UP to a multiple of
      --target-step (default 0.05). --target overrides it.
    * iterations to target: the first iteration whose smoothed loss is <= target.
    * tokens dropped: 1 - survival, survival = computed (token, expert) pairs / routed pairs over
      all iterations and MoE layers (``tokens_per_expert`` are the computed pairs,
      ``dropped_tokens`` the dropped ones).
    * meas s/iter: median of ``iter_time_s`` after the first --warmup-iters iterations, measured
      where the runs ran (here: 2 CPU ranks; a shared machine makes it noisy).
    * simulated ms/iter: ``megatron_swiftmoe.sim`` replays the run's OWN routing trace (expert
      popularity shares per iteration and layer) on a cluster with the paper's GPT-Small shape
      (configs/gpt_small_moe.yaml: 12 layers, hidden 768, 16 experts, 4 slots/GPU, batch 64 x 512,
      bf16) for that strategy (megatron -> static, swiftmoe -> swiftmoe with capacity factor 1.0,
      swiftmoe-dropless -> swiftmoe dropless); mean over the trace. Clusters: paper-a100-16 and
      --h100-cluster (default h100-16).
    * simulated minutes to target = iterations to target x simulated ms/iter.
    * speedups (per cluster) = minutes to target of deepspeed (of the best FlexMoE) / this row's;
      > 1 is faster.

Usage
    python scripts/reproduce_paper.py                              # all 7 strategies, CPU scale
    python scripts/reproduce_paper.py --train-iters 1000 --hidden-size 128 --report-dir runs/rp
    python scripts/reproduce_paper.py --strategies megatron,swiftmoe --train-iters 100
    python scripts/reproduce_paper.py --reuse --report-dir runs/reproduce   # table only, no training

Writes REPORT_DIR/report.md, REPORT_DIR/loss_curves.png, REPORT_DIR/table.json and keeps every
run under REPORT_DIR/runs/<strategy>/ (metrics.jsonl, train.log, train.err, exit_code, run.json).
A failed run is reported with the tail of its stderr and marked failed; the others go on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REPORT_DIR = REPO / "runs" / "reproduce_paper"
CAPACITY_FACTOR = 1.0  # the paper's, for deepspeed / flexmoe / swiftmoe
FLEXMOE_INTERVALS = (100, 50, 10)

#: Strategy -> training flags on top of the common ones (same program, seed, data, init).
STRATEGY_FLAGS: dict[str, list[str]] = {
    "megatron": ["--no-swiftmoe"],
    "deepspeed": ["--no-swiftmoe", "--moe-expert-capacity-factor", str(CAPACITY_FACTOR)],
    **{
        f"flexmoe-{k}": ["--swiftmoe", "--swiftmoe-replan-interval", str(k),
                         "--moe-expert-capacity-factor", str(CAPACITY_FACTOR)]
        for k in FLEXMOE_INTERVALS
    },
    "swiftmoe": ["--swiftmoe", "--moe-expert-capacity-factor", str(CAPACITY_FACTOR)],
    "swiftmoe-dropless": ["--swiftmoe"],
}
STRATEGIES = tuple(STRATEGY_FLAGS)

#: Strategy -> (simulator strategy, SwiftMoE capacity factor for the simulator).
SIM_STRATEGY: dict[str, tuple[str, Optional[float]]] = {
    "megatron": ("static", None),
    "deepspeed": ("deepspeed", None),
    **{f"flexmoe-{k}": (f"flexmoe-{k}", None) for k in FLEXMOE_INTERVALS},
    "swiftmoe": ("swiftmoe", CAPACITY_FACTOR),
    "swiftmoe-dropless": ("swiftmoe", None),
}



def _flexmoe_interval(name: str) -> Optional[int]:
    if name.startswith("flexmoe-") and name[8:].isdigit() and int(name[8:]) >= 1:
        return int(name[8:])
    return None


def strategy_flags(name: str) -> list[str]:
    """Training flags of a strategy; any ``flexmoe-<K>`` (K >= 1) works, not only 10/50/100."""
    if name in STRATEGY_FLAGS:
        return STRATEGY_FLAGS[name]
    k = _flexmoe_interval(name)
    if k is None:
        raise ValueError(f"unknown strategy {name!r}: choose from {', '.join(STRATEGIES)} or flexmoe-<K>")
    return ["--swiftmoe", "--swiftmoe-replan-interval", str(k), "--moe-expert-capacity-factor", str(CAPACITY_FACTOR)]


def sim_strategy(name: str) -> tuple[str, Optional[float]]:
    """(simulator strategy, SwiftMoE capacity factor for the simulator) of a strategy."""
    if name in SIM_STRATEGY:
        return SIM_STRATEGY[name]
    strategy_flags(name)  # raises for an unknown name
    return name, None


PAPER_CLUSTER = "paper-a100-16"
DEFAULT_H100_CLUSTER = "h100-16"
DEFAULT_SIM_CONFIG = REPO / "configs" / "gpt_small_moe.yaml"

#: The paper's GPT-Small numbers (minutes to target loss 4.0 on 16 x A100), for the report.
PAPER_MINUTES = {"deepspeed": 147.84, "flexmoe-100": 145.42, "flexmoe-50": 141.60, "flexmoe-10": 138.61,
                 "swiftmoe": 102.68}


# ============================================================================ runs and metrics


@dataclass
class Run:
    """One strategy's run as found on disk. ``status``: ok | failed | missing."""

    name: str
    status: str
    records: list[dict] = field(default_factory=list)
    metrics_path: Optional[Path] = None
    error: str = ""  # why it failed (tail of stderr) or is missing
    command: Optional[list[str]] = None
    wall_s: Optional[float] = None

    @property
    def iterations(self) -> list[int]:
        return [int(r["iteration"]) for r in self.records]

    @property
    def losses(self) -> list[float]:
        return [float(r["lm_loss"]) for r in self.records]


def read_metrics(path: Path) -> list[dict]:
    """Training records of a metrics JSONL, by iteration (the last record of an iteration wins,
    as after a resume). Lines that are not JSON objects with ``iteration`` and ``lm_loss`` are
    skipped (a run killed mid-write leaves a partial last line)."""
    by_iteration: dict[int, dict] = {}
    with open(path, encoding="utf-8") as file:
        for line in file:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "iteration" in record and "lm_loss" in record:
                by_iteration[int(record["iteration"])] = record
    return [by_iteration[i] for i in sorted(by_iteration)]


def tail(path: Path, chars: int = 3000) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return text[-chars:]


def error_lines(text: str, limit: int = 8) -> list[str]:
    """The lines of a torchrun stderr that say what went wrong (argparse ``error:`` lines,
    exception lines), de-duplicated across ranks; torchrun's own failure block comes last in
    the stderr and hides them from a plain tail."""
    found: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(("error_file", "traceback :")):
            continue
        if ("error:" in stripped.lower() or stripped.split(":")[0].endswith(("Error", "Exception", "Interrupt"))
                or stripped.startswith("SystemExit")):
            if stripped not in found:
                found.append(stripped)
    return found[-limit:]


def load_run(run_dir: Path, name: str) -> Run:
    """A strategy's run directory -> :class:`Run`. ``exit_code`` (written by this script and by
    the SLURM script) != 0 makes it failed; no metrics makes it missing (or failed)."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    info: dict = {}
    if (run_dir / "run.json").is_file():
        try:
            info = json.loads((run_dir / "run.json").read_text())
        except (OSError, json.JSONDecodeError):
            info = {}
    exit_code: Optional[int] = None
    if (run_dir / "exit_code").is_file():
        try:
            exit_code = int((run_dir / "exit_code").read_text().strip())
        except ValueError:
            exit_code = -1
    records = read_metrics(metrics) if metrics.is_file() else []
    run = Run(name, "ok", records, metrics if metrics.is_file() else None,
              command=info.get("command"), wall_s=info.get("wall_s"))
    if exit_code not in (None, 0):
        run.status = "failed"
        err = tail(run_dir / "train.err", 200_000) or tail(run_dir / "train.log", 200_000)
        key = error_lines(err)
        run.error = (f"exit code {exit_code}" + ("; errors:\n" + "\n".join(key) if key else "")
                     + (f"\nstderr tail:\n{err[-2500:]}" if err else ""))
    elif not records:
        run.status = "missing" if exit_code is None else "failed"
        run.error = f"no metrics in {metrics}"
    return run


def load_runs(report_dir: Path, strategies: Sequence[str]) -> dict[str, Run]:
    return {name: load_run(Path(report_dir) / "runs" / name, name) for name in strategies}


# ============================================================================ table logic


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average: out[i] = mean(values[max(0, i - window + 1) .. i])."""
    if window < 1:
        raise ValueError(f"smoothing window must be >= 1, got {window}")
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def choose_target(smoothed: dict[str, Sequence[float]], step: float = 0.05) -> float:
    """A loss every run reaches: max over runs of their minimum smoothed loss, rounded up to a
    multiple of ``step`` (step <= 0: not rounded)."""
    curves = {k: v for k, v in smoothed.items() if len(v)}
    if not curves:
        raise ValueError("no loss curve to choose a target from")
    worst_best = max(min(v) for v in curves.values())
    if step <= 0:
        return worst_best
    # Rounded up to the step; the small tolerance keeps exact multiples where they are.
    return round(math.ceil(worst_best / step - 1e-9) * step, 10)


def iterations_to_target(iterations: Sequence[int], smoothed: Sequence[float], target: float) -> Optional[int]:
    """First iteration whose smoothed loss is <= target (None: never reached)."""
    for iteration, value in zip(iterations, smoothed):
        if value <= target + 1e-12:
            return int(iteration)
    return None


def token_counts(records: Sequence[dict]) -> tuple[int, int]:
    """(computed pairs, dropped pairs) over all iterations and MoE layers."""
    kept = dropped = 0
    for record in records:
        for layer in record.get("layers", []):
            kept += int(sum(layer.get("tokens_per_expert", [])))
            dropped += int(layer.get("dropped_tokens", 0))
    return kept, dropped


def token_survival(records: Sequence[dict]) -> Optional[float]:
    kept, dropped = token_counts(records)
    return kept / (kept + dropped) if kept + dropped else None


def survival_per_iteration(records: Sequence[dict]) -> list[float]:
    out = []
    for record in records:
        value = token_survival([record])
        out.append(1.0 if value is None else value)
    return out


def median_iter_time(records: Sequence[dict], warmup: int) -> Optional[float]:
    """Median ``iter_time_s`` after the first ``warmup`` iterations (all of them if fewer)."""
    times = [float(r["iter_time_s"]) for r in records if r.get("iter_time_s") is not None]
    after = times[warmup:] or times
    return statistics.median(after) if after else None


def rank_imbalance(records: Sequence[dict], key: str = "tokens_per_rank", warmup: int = 0) -> Optional[float]:
    """Mean over iterations (after ``warmup``) and MoE layers of max/mean rank load."""
    values = []
    for record in list(records)[warmup:] or records:
        for layer in record.get("layers", []):
            loads = layer.get(key)
            if loads:
                mean = sum(loads) / len(loads)
                values.append(max(loads) / mean if mean else 1.0)
    return statistics.mean(values) if values else None


def migration_bytes(records: Sequence[dict]) -> int:
    return int(sum((r.get("bytes_sent") or {}).get("expert_migration", 0) for r in records))


# ---------------------------------------------------------------------------- simulator


def sim_model(sim_config: str | Path, cluster_name: str):
    """(cluster, model shape, note) for the simulator; the global batch is raised to the nearest
    multiple of GPUs x micro-batch when the cluster is larger than the config's batch allows."""
    from megatron_swiftmoe.sim import get_cluster, load_model

    cluster = get_cluster(cluster_name)
    model = load_model(str(sim_config))
    step = cluster.num_gpus * model.micro_batch_size
    note = ""
    if model.global_batch_size % step:
        batch = max(step, -(-model.global_batch_size // step) * step)
        note = (f"{cluster.name}: global batch raised from {model.global_batch_size} to {batch} sequences "
                f"(a multiple of {cluster.num_gpus} GPUs x micro-batch {model.micro_batch_size})")
        model = model.replace(global_batch_size=batch)
    return cluster, model, note


def _load_trace(metrics_path: Path, max_iters: Optional[int]):
    from megatron_swiftmoe.sim import load_trace

    trace = load_trace(metrics_path)
    if max_iters and trace.num_iterations > max_iters:
        trace = dataclasses.replace(
            trace, tokens=trace.tokens[:max_iters], iterations=trace.iterations[:max_iters],
            iter_time_s=trace.iter_time_s[:max_iters], bytes_sent=trace.bytes_sent[:max_iters],
        )
    return trace


def simulate_run(metrics_path: Path, strategy: str, cluster_name: str, sim_config: str | Path = DEFAULT_SIM_CONFIG,
                 mfu: float = 0.4, max_iters: Optional[int] = None, planning_ms: Optional[float] = None,
                 static_ep: Optional[int] = None) -> dict:
    """Simulated time per iteration of ``strategy`` replaying ``metrics_path``'s routing on a
    cluster. Returns ``{time_ms, parts_ms, load_imbalance, survival, cluster, note}``."""
    from megatron_swiftmoe.sim import simulate

    sim_name, swift_cf = sim_strategy(strategy)
    cluster, model, note = sim_model(sim_config, cluster_name)
    trace = _load_trace(Path(metrics_path), max_iters)
    result = simulate(trace, cluster, model, [sim_name], mfu=mfu, capacity_factor=CAPACITY_FACTOR,
                      swiftmoe_capacity_factor=swift_cf, **_sim_kwargs(planning_ms, static_ep))
    row = result["strategies"][sim_name]
    settings = result.get("settings", {})
    if sim_name.startswith(("swiftmoe", "flexmoe")) and "planning_s_per_layer" in settings:
        how = "measured on this CPU" if settings.get("planning_measured") else "given"
        note = "; ".join(x for x in [note, (
            f"simulated SwiftMoE planning ({how}): {1e3 * settings['planning_s_per_layer']:.2f} ms per MoE layer and "
            f"iteration + {1e3 * settings.get('rank_plan_s_per_layer_microbatch', 0.0):.2f} ms per layer and "
            "micro-batch")] if x)
    return dict(time_ms=row["time_ms"], parts_ms=row["parts_ms"], load_imbalance=row["load_imbalance"],
                survival=row["survival"], replan_slowdown=row.get("replan_slowdown"), cluster=cluster.name,
                model=model.summary() if hasattr(model, "summary") else str(model.name), note=note,
                notes=result.get("notes", []), iterations=trace.num_iterations)


def _sim_kwargs(planning_ms: Optional[float], static_ep: Optional[int] = None) -> dict:
    return {"static_ep": static_ep, **({} if planning_ms is None else {"planning_s": planning_ms / 1e3})}


def simulate_common(metrics_path: Path, cluster_name: str, sim_config: str | Path = DEFAULT_SIM_CONFIG,
                    mfu: float = 0.4, max_iters: Optional[int] = None,
                    planning_ms: Optional[float] = None, strategies: Optional[Sequence[str]] = None,
                    static_ep: Optional[int] = None) -> dict[str, dict]:
    """Every simulator strategy on ONE routing trace (a dropless run's): per-iteration time
    without the differences between the runs' own routings."""
    from megatron_swiftmoe.sim import simulate

    cluster, model, _ = sim_model(sim_config, cluster_name)
    trace = _load_trace(Path(metrics_path), max_iters)
    strategies = list(STRATEGIES) + [s for s in (strategies or []) if s not in STRATEGIES]
    names = list(dict.fromkeys(sim_strategy(s)[0] for s in strategies if sim_strategy(s)[1] is None))
    out = {}
    for strategy in strategies:
        sim_name, swift_cf = sim_strategy(strategy)
        if swift_cf is not None:
            res = simulate(trace, cluster, model, [sim_name], mfu=mfu, capacity_factor=CAPACITY_FACTOR,
                           swiftmoe_capacity_factor=swift_cf, **_sim_kwargs(planning_ms, static_ep))
        else:
            if "_all" not in out:
                out["_all"] = simulate(trace, cluster, model, names, mfu=mfu, capacity_factor=CAPACITY_FACTOR,
                                       swiftmoe_capacity_factor=None, **_sim_kwargs(planning_ms, static_ep))
            res = out["_all"]
        row = res["strategies"][sim_name]
        out[strategy] = dict(time_ms=row["time_ms"], survival=row["survival"], load_imbalance=row["load_imbalance"])
    out.pop("_all", None)
    return out


SimFn = Callable[[Path, str, str], dict]


# ---------------------------------------------------------------------------- the table


@dataclass
class Table:
    rows: list[dict]
    target: Optional[float]
    target_rule: str
    clusters: list[str]
    smooth_window: int
    warmup: int
    notes: list[str] = field(default_factory=list)
    curves: dict[str, dict] = field(default_factory=dict)  # name -> iterations, smoothed, survival

    def row(self, name: str) -> dict:
        return next(r for r in self.rows if r["strategy"] == name)


def build_table(
    runs: dict[str, Run],
    *,
    smooth_window: int = 25,
    target: Optional[float] = None,
    target_step: float = 0.05,
    warmup: int = 10,
    clusters: Sequence[str] = (PAPER_CLUSTER, DEFAULT_H100_CLUSTER),
    simulate: Optional[SimFn] = None,
) -> Table:
    """The paper's table from the runs' metrics. ``simulate(metrics_path, strategy, cluster)``
    returns ``{"time_ms": ...}`` (default: :func:`simulate_run`; a failure marks the cell n/a)."""
    if simulate is None:
        simulate = simulate_run
    notes: list[str] = []
    ok = {name: run for name, run in runs.items() if run.status == "ok"}
    curves = {}
    for name, run in ok.items():
        curves[name] = dict(iterations=run.iterations, loss=run.losses, smoothed=smooth(run.losses, smooth_window),
                            survival=survival_per_iteration(run.records))
    if target is not None:
        rule = f"given (--target {target:g})"
    elif curves:
        worst = max(curves, key=lambda k: min(curves[k]["smoothed"]))
        target = choose_target({k: c["smoothed"] for k, c in curves.items()}, target_step)
        rule = (f"max over the {len(curves)} successful runs of their minimum {smooth_window}-iteration moving-average "
                f"loss ({min(curves[worst]['smoothed']):.4f}, {worst}), rounded up to a multiple of {target_step:g}")
    else:
        rule = "no successful run"
    rows = []
    for name, run in runs.items():
        row: dict[str, Any] = dict(strategy=name, status=run.status, error=run.error, sim={})
        if run.status != "ok":
            if run.records:
                row["iterations"] = len(run.records)
            rows.append(row)
            continue
        c = curves[name]
        kept, dropped = token_counts(run.records)
        row.update(
            iterations=len(run.records),
            final_loss=c["smoothed"][-1],
            min_loss=min(c["smoothed"]),
            valid_loss=next((r["valid_lm_loss"] for r in reversed(run.records) if "valid_lm_loss" in r), None),
            iters_to_target=iterations_to_target(c["iterations"], c["smoothed"], target) if target is not None else None,
            dropped_pct=100.0 * dropped / (kept + dropped) if kept + dropped else None,
            cpu_s_per_iter=median_iter_time(run.records, warmup),
            rank_imbalance=rank_imbalance(run.records, "tokens_per_rank", warmup),
            static_imbalance=rank_imbalance(run.records, "static_tokens_per_rank", warmup),
            migration_gb=migration_bytes(run.records) / 1e9,
            wall_s=run.wall_s,
        )
        if row["cpu_s_per_iter"] is not None and row["iters_to_target"] is not None:
            row["cpu_min_to_target"] = row["iters_to_target"] * row["cpu_s_per_iter"] / 60
        for cluster in clusters:
            cell: dict[str, Any] = {}
            try:
                sim = simulate(run.metrics_path, name, cluster)
                cell["ms_per_iter"] = float(sim["time_ms"])
                if sim.get("parts_ms"):
                    cell["parts_ms"] = {k: float(v) for k, v in sim["parts_ms"].items()}
                for note in (sim.get("note") or "").split("; "):
                    if note and note not in notes:
                        notes.append(note)
            except Exception as error:  # noqa: BLE001 -- a simulator problem must not lose the table
                cell["error"] = f"{type(error).__name__}: {error}"
                note = f"simulation of {name} on {cluster} failed: {cell['error']}"
                notes.append(note)
            if "ms_per_iter" in cell and row["iters_to_target"] is not None:
                cell["min_to_target"] = row["iters_to_target"] * cell["ms_per_iter"] / 60000
            row["sim"][cluster] = cell
        rows.append(row)
    # Speedups per cluster: time to target of deepspeed / of the best FlexMoE over this row's.
    for cluster in clusters:
        minutes = {r["strategy"]: r["sim"].get(cluster, {}).get("min_to_target") for r in rows if r["status"] == "ok"}
        ds = minutes.get("deepspeed")
        flex = [m for k, m in minutes.items() if k.startswith("flexmoe-") and m is not None]
        best_flex = min(flex) if flex else None
        for r in rows:
            own = minutes.get(r["strategy"])
            cell = r["sim"].setdefault(cluster, {})
            cell["speedup_vs_deepspeed"] = ds / own if ds and own else None
            cell["speedup_vs_best_flexmoe"] = best_flex / own if best_flex and own else None
    if runs.get("megatron") and runs.get("swiftmoe-dropless") and "megatron" in ok and "swiftmoe-dropless" in ok:
        a, b = ok["megatron"].losses, ok["swiftmoe-dropless"].losses
        n = min(len(a), len(b))
        if n:
            diffs = [abs(x - y) for x, y in zip(a[:n], b[:n])]
            apart = next((i + 1 for i, d in enumerate(diffs) if d > 1e-4), None)
            notes.append(
                f"megatron vs swiftmoe-dropless (same math, different layout): max |lm loss difference| over {n} "
                f"iterations = {max(diffs):.2e}" + (
                    f"; below 1e-4 up to iteration {apart - 1}, after which fp32 round-off differences (different "
                    "summation orders) grow through training" if apart else ""))
    return Table(rows, target, rule, list(clusters), smooth_window, warmup, notes, curves)


def summary_lines(table: Table) -> list[str]:
    """The comparisons the paper makes, in words, from the table (empty where a run is missing)."""
    rows = {r["strategy"]: r for r in table.rows if r["status"] == "ok"}
    out = []
    swift, ds = rows.get("swiftmoe"), rows.get("deepspeed")
    flex = {k: r for k, r in rows.items() if k.startswith("flexmoe-")}
    if swift and ds and swift.get("iters_to_target") and ds.get("iters_to_target"):
        out.append(f"iterations to target: swiftmoe {swift['iters_to_target']} vs deepspeed {ds['iters_to_target']} "
                   f"= {100 * (1 - swift['iters_to_target'] / ds['iters_to_target']):.1f}% fewer (paper: 28.5% fewer)")
    if swift and swift.get("dropped_pct") is not None:
        others = {k: r["dropped_pct"] for k, r in {**({"deepspeed": ds} if ds else {}), **flex}.items()
                  if r.get("dropped_pct")}
        if others:
            fewer = {k: 100 * (1 - swift["dropped_pct"] / v) for k, v in others.items()}
            out.append(f"tokens dropped: swiftmoe {swift['dropped_pct']:.1f}% vs "
                       + ", ".join(f"{k} {others[k]:.1f}%" for k in others)
                       + f" = {min(fewer.values()):.0f}-{max(fewer.values()):.0f}% fewer dropped (paper: 43-69% fewer)")
    for cluster in table.clusters:
        if not (swift and ds):
            continue
        a, b = swift["sim"].get(cluster, {}), ds["sim"].get(cluster, {})
        if a.get("ms_per_iter") and b.get("ms_per_iter"):
            ratio = b["ms_per_iter"] / a["ms_per_iter"]
            line = (f"{cluster}: simulated time per iteration swiftmoe {a['ms_per_iter']:.1f} ms vs deepspeed "
                    f"{b['ms_per_iter']:.1f} ms: swiftmoe "
                    + (f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower")
                    + " per iteration (paper, A100: 1.03x faster)")
            for name, cell in (("swiftmoe", a), ("deepspeed", b)):
                parts = cell.get("parts_ms")
                if parts:
                    top = sorted(parts.items(), key=lambda kv: -kv[1])[:3]
                    line += f"; {name}'s largest parts: " + ", ".join(f"{k} {v:.1f} ms" for k, v in top)
            out.append(line)
        if a.get("speedup_vs_deepspeed"):
            out.append(f"{cluster}: simulated minutes to target swiftmoe vs deepspeed {a['speedup_vs_deepspeed']:.2f}x, "
                       f"vs the best flexmoe {_fmt(a.get('speedup_vs_best_flexmoe'), '.2f')}x (paper, A100: 1.44x and "
                       "1.35x)")
    return out


def _fmt(value: Any, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def short_cluster(name: str) -> str:
    """paper-a100-16 -> A100x16, h100-16 -> H100x16 (column headers)."""
    if name == PAPER_CLUSTER:
        return "A100x16"
    if name.startswith("h100-") and name[5:].isdigit():
        return f"H100x{name[5:]}"
    return name


def table_columns(table: Table) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the main table (the paper's shape: one row per strategy)."""
    head = ["strategy", "status", "iters to target", "dropped %", "meas s/iter"]
    for cluster in table.clusters:
        name = short_cluster(cluster)
        head += [f"{name} ms/iter", f"{name} min", f"{name} vs DS", f"{name} vs Flex"]
    lines = []
    for r in table.rows:
        if r["status"] != "ok":
            status = r["status"] + (f" ({r['iterations']} it)" if r.get("iterations") else "")
            lines.append([r["strategy"], status] + ["-"] * (len(head) - 2))
            continue
        reached = r["iters_to_target"]
        line = [r["strategy"], "ok", _fmt(reached, "d", "not reached"), _fmt(r["dropped_pct"], ".1f"),
                _fmt(r["cpu_s_per_iter"], ".3f")]
        for cluster in table.clusters:
            cell = r["sim"].get(cluster, {})
            line += [
                _fmt(cell.get("ms_per_iter"), ".1f", "n/a" if "error" in cell else "-"),
                _fmt(cell.get("min_to_target"), ".2f"),
                _fmt(cell.get("speedup_vs_deepspeed"), ".2f") + ("x" if cell.get("speedup_vs_deepspeed") else ""),
                _fmt(cell.get("speedup_vs_best_flexmoe"), ".2f") + ("x" if cell.get("speedup_vs_best_flexmoe") else ""),
            ]
        lines.append(line)
    return head, lines


def format_table(table: Table) -> str:
    head, lines = table_columns(table)
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    out.append("-" * len(out[0]))
    for line in lines:
        out.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))))
    target = "none" if table.target is None else f"{table.target:.4g}"
    out.append(f"target loss {target}: {table.target_rule}")
    if table.clusters:
        out.append("ms/iter: simulated time per iteration replaying the run's routing; min: simulated minutes to "
                   "target (iterations x ms/iter); vs DS / vs Flex: speedup in minutes to target over deepspeed / "
                   "the best flexmoe-K (> 1 = faster)")
    return "\n".join(out)


def markdown_table(head: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def detail_columns(table: Table) -> tuple[list[str], list[list[str]]]:
    head = ["strategy", "iterations", "final smoothed loss", "min smoothed loss", "valid loss", "token survival %",
            "rank max/mean (measured)", "rank max/mean (static EP, same routing)", "migrated GB", "CPU min to target",
            "run wall s"]
    lines = []
    for r in table.rows:
        if r["status"] != "ok":
            lines.append([r["strategy"], _fmt(r.get("iterations"), "d")] + ["-"] * (len(head) - 2))
            continue
        lines.append([
            r["strategy"], str(r["iterations"]), _fmt(r["final_loss"], ".4f"), _fmt(r["min_loss"], ".4f"),
            _fmt(r["valid_loss"], ".4f"), _fmt(None if r["dropped_pct"] is None else 100 - r["dropped_pct"], ".1f"),
            _fmt(r["rank_imbalance"], ".2f"), _fmt(r["static_imbalance"], ".2f"), _fmt(r["migration_gb"], ".3f"),
            _fmt(r.get("cpu_min_to_target"), ".2f"), _fmt(r.get("wall_s"), ".0f"),
        ])
    return head, lines


# ============================================================================ report and plot


def plot_curves(table: Table, path: Path) -> Optional[Path]:
    """Smoothed loss per strategy with the target line, and token survival per iteration."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(9, 8), sharex=True, gridspec_kw=dict(height_ratios=[3, 1.3]))
    for name, c in table.curves.items():
        style = ":" if name == "megatron" else "--" if name == "deepspeed" else "-"
        (line,) = ax.plot(c["iterations"], c["smoothed"], label=name, linewidth=1.4, linestyle=style)
        bx.plot(c["iterations"], [100 * s for s in smooth(c["survival"], table.smooth_window)],
                color=line.get_color(), linewidth=1.0)
    if table.target is not None:
        ax.axhline(table.target, color="black", linestyle="--", linewidth=1, label=f"target {table.target:.4g}")
    ax.set_ylabel(f"training loss ({table.smooth_window}-iteration moving average)")
    ax.set_title("Loss curves: same model, seed and data; strategy differs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if table.curves:
        lows = [min(c["smoothed"]) for c in table.curves.values()]
        highs = [c["smoothed"][min(len(c["smoothed"]) - 1, max(table.smooth_window, len(c["smoothed"]) // 10))]
                 for c in table.curves.values()]
        lo, hi = min(lows), max(highs)
        if hi > lo:
            ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    bx.set_ylabel("token survival %\n(moving average)")
    bx.set_xlabel("iteration")
    bx.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(table: Table, report_dir: Path, settings: dict, common: Optional[dict] = None,
                 plot: bool = True) -> dict[str, Path]:
    """report.md, table.json and loss_curves.png under ``report_dir``."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    paths = {"report": report_dir / "report.md", "json": report_dir / "table.json"}
    png = plot_curves(table, report_dir / "loss_curves.png") if plot else None
    if png:
        paths["plot"] = png
    head, lines = table_columns(table)
    dhead, dlines = detail_columns(table)
    md = ["# SwiftMoE paper reproduction: time to target loss", ""]
    md += ["Shape of the paper's GPT-Small table (arXiv 2504.19925): one row per strategy, same model, seed, data "
           "and initial weights; iterations to a common target loss measured by training, time per iteration "
           "simulated on the paper's cluster (and an H100 cluster) from each run's own routing trace.", ""]
    md += ["## Table", "", markdown_table(head, lines), ""]
    target = "none" if table.target is None else f"{table.target:.4g}"
    md += [f"**Target loss {target}**: {table.target_rule}. A run reaches it at the first iteration whose "
           f"{table.smooth_window}-iteration trailing moving average of the training lm loss is <= the target.", ""]
    md += ["Columns: *dropped %* = dropped (token, expert) pairs / routed pairs over the whole run (measured); "
           f"*meas s/iter* = median measured iteration time (`iter_time_s`) after the first {table.warmup} "
           "iterations, on the hardware the runs ran on (see Settings: CPU ranks for the default runs); *ms/iter* = simulated mean time per iteration (`megatron_swiftmoe.sim`) of that "
           "strategy on the cluster, replaying this run's routing; *min to target* = iterations to target x "
           "simulated ms/iter; *vs DS* / *vs best Flex* = minutes to target of deepspeed / of the fastest "
           "FlexMoE divided by this row's (> 1: faster).", ""]
    summary = summary_lines(table)
    if summary:
        md += ["## Against the paper's claims", ""] + [f"- {line}" for line in summary] + [""]
    md += ["## Details (measured)", "", markdown_table(dhead, dlines), ""]
    if common:
        md += ["## Simulated time per iteration on one common routing trace", "",
               f"All strategies replaying the routing of `{common['trace']}` (dropless, so the routing is "
               "pre-drop). This separates each strategy's per-iteration cost from the differences between "
               "the runs' own routings (the dropping runs' traces record computed pairs, i.e. after drops).", ""]
        per_cluster = common["clusters"]
        names = list(next(iter(per_cluster.values()), {}))
        chead = ["strategy"] + [f"{c} ms/iter" for c in per_cluster] + [f"{c} survival % (sim)" for c in per_cluster]
        clines = []
        for name in names:
            cells = [per_cluster[c].get(name, {}) for c in per_cluster]
            clines.append([name] + [_fmt(x.get("time_ms"), ".1f") for x in cells]
                          + [_fmt(None if x.get("survival") is None else 100 * x["survival"], ".1f") for x in cells])
        md += [markdown_table(chead, clines), ""]
    md += ["## The paper (GPT-Small, 16 x A100, target loss 4.0)", "",
           "| strategy | minutes to target | vs DeepSpeed |", "| --- | --- | --- |"]
    for name, minutes in PAPER_MINUTES.items():
        md.append(f"| {name} | {minutes:.2f} | {PAPER_MINUTES['deepspeed'] / minutes:.2f}x |")
    md += ["", "Paper: SwiftMoE 30.5% faster than DeepSpeed and 25.9% faster than the best FlexMoE, 28.5% fewer "
           "iterations than DeepSpeed, 43-69% fewer dropped tokens, per-iteration time 2.8% faster than DeepSpeed "
           "(GPT-Small).", ""]
    failed = [r for r in table.rows if r["status"] != "ok"]
    if failed:
        md += ["## Failed or missing runs", ""]
        for r in failed:
            md += [f"### {r['strategy']} ({r['status']})", "", "```", (r["error"] or "").strip()[-3000:], "```", ""]
    md += ["## Settings", ""]
    for key, value in settings.items():
        md.append(f"- **{key}**: {value}")
    md += ["", "## Notes", ""]
    md += [f"- {n}" for n in table.notes] or ["- none"]
    md += ["", "## Differences from the paper (read before comparing numbers)", ""]
    md += [f"- {c}" for c in CAVEATS]
    md.append("")
    paths["report"].write_text("\n".join(md), encoding="utf-8")
    paths["json"].write_text(json.dumps(dict(
        target=table.target, target_rule=table.target_rule, clusters=table.clusters, smooth_window=table.smooth_window,
        warmup=table.warmup, rows=table.rows, notes=table.notes, settings=settings, common=common,
    ), indent=1, default=str), encoding="utf-8")
    return paths


CAVEATS = [
    "Scale: the paper trains GPT-Small/Medium/Large MoE (125M-760M dense parameters, 16 experts, sequence 512, "
    "batch 64) on 16 A100 GPUs to loss 4.0; the default here is a 2-layer, hidden-64 model with 16 experts on 2 CPU "
    "ranks (gloo), sequence 128, batch 16, for a few hundred iterations, on Python-source text. Iterations to target "
    "are therefore this small model's, not GPT-Small's, and the target is chosen from the runs (the paper fixed 4.0).",
    "Slots: N*S/E is the paper's 4 (2 ranks x 32 slots for 16 experts vs 16 GPUs x 4 slots) by default, but with 2 "
    "ranks the per-rank balance problem is much coarser than with 16 (static EP puts 8 experts on each rank).",
    "Routing: with aux-loss coefficient 1e-5 a small model's router becomes very skewed early in training (see the "
    "survival panel of loss_curves.png and the 'rank max/mean (static EP)' column; 2.0 is the maximum for 2 ranks). "
    "At the default CPU scale static placement with capacity 1.0 keeps far fewer tokens than the paper reports "
    "(45% survival at capacity 1.0 with 32 experts), so the iteration differences between dropping and "
    "non-dropping strategies need not match the paper's.",
    "Per-iteration time in the simulator vs the paper: with 16 experts on 16 GPUs static EP (megatron, deepspeed) "
    "holds one expert per GPU and synchronises no expert gradients or weights, while SwiftMoE and FlexMoE hold 4 "
    "slots per GPU and reduce/scatter 4 experts' gradients and weights per GPU and layer every iteration; the "
    "simulator charges that traffic in full (no overlap with compute), and models DeepSpeed's compute and "
    "all-to-all on padded capacity buffers whatever the skew. The paper measured SwiftMoE 2.8% faster per "
    "iteration than DeepSpeed on GPT-Small; check the 'largest parts' line before reading the minutes columns.",
    "Minutes to target combine two different scales: iterations to target from the small CPU model, and the "
    "simulated time per iteration of the paper's GPT-Small shape (configs/gpt_small_moe.yaml) on the simulated "
    "cluster replaying the small model's routing shares (its 2 MoE layers replayed over GPT-Small's 12; its 2-rank "
    "trace re-placed on 16 GPUs). They answer 'what would this routing cost on that cluster', not 'what GPT-Small "
    "would take'.",
    "The simulator is an analytic cost model (compute at a fixed MFU of 0.4 of peak, NCCL-style ring/all-to-all "
    "latency + bytes over spec bandwidths, no overlap between parts, SwiftMoE planning time measured on this CPU); "
    "it is not a measurement on GPUs. Its DeepSpeed model uses padded capacity buffers, so its per-iteration time "
    "does not depend on the skew; its FlexMoE model re-plans from the trace itself.",
    "The dropping runs' traces record computed pairs (after drops), so their replayed popularity is flatter than "
    "what the router chose; the 'common routing trace' section shows all strategies on one dropless trace instead.",
    "FlexMoE is this program's FlexMoE-like mode (replicas re-planned every K iterations from the popularity since "
    "the last re-plan, moved experts' weights and optimizer state really transferred), not FlexMoE's code: no "
    "skew threshold, same placement algorithm as SwiftMoE. DeepSpeed is Megatron's static EP with capacity factor "
    "1.0 and the probs drop policy, not DeepSpeed-MoE's code.",
    "CPU times are wall-clock on a shared 2-core machine (other processes may run): they say little about GPU "
    "time; on CPU the experts are a small part of an iteration and SwiftMoE's slot loop and gloo all-to-alls add "
    "overhead, so its CPU time per iteration can be higher than static EP's even when it balances the load.",
]


# ============================================================================ training


def common_flags(args: argparse.Namespace) -> list[str]:
    """Training flags shared by every strategy (the model, data, schedule and seed)."""
    h = args.hidden_size
    flags = [
        "--num-layers", str(args.num_layers), "--hidden-size", str(h), "--num-attention-heads", str(args.num_heads),
        "--ffn-hidden-size", str(args.ffn_hidden_size or 4 * h), "--seq-length", str(args.seq_length),
        "--micro-batch-size", str(args.micro_batch_size), "--global-batch-size", str(args.global_batch_size),
        "--num-experts", str(args.num_experts), "--moe-router-topk", str(args.topk),
        *(["--moe-router-pre-softmax"] if args.topk == 1 else []),
        "--moe-router-load-balancing-type", "aux_loss", "--moe-aux-loss-coeff", f"{args.aux_loss_coeff:g}",
        "--hidden-dropout", "0", "--attention-dropout", "0",
        "--lr", f"{args.lr:g}", "--min-lr", f"{args.lr / 10:g}", "--lr-decay-style", "cosine",
        "--lr-warmup-iters", str(max(1, args.train_iters // 50)),
        "--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--clip-grad", "1.0",
        "--seed", str(args.seed), "--train-iters", str(args.train_iters),
        "--eval-interval", str(args.train_iters), "--eval-iters", str(args.eval_iters),
        "--log-interval", str(max(1, args.train_iters // 10)), "--no-progress",
        "--swiftmoe-slots-per-rank", str(args.slots_per_rank),
    ]
    return flags + shlex.split(args.extra_args or "")


def train_command(args: argparse.Namespace, strategy: str, metrics: Path) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.ranks),
        "-m", "megatron_swiftmoe.pretrain_gpt", *common_flags(args), *strategy_flags(strategy),
        "--metrics-path", str(metrics),
    ]


def _count_lines(path: Path) -> tuple[int, Optional[float]]:
    try:
        records = read_metrics(path)
    except OSError:
        return 0, None
    return len(records), (records[-1]["lm_loss"] if records else None)


def run_strategy(args: argparse.Namespace, strategy: str, run_dir: Path, index: int, total: int) -> Run:
    """Train one strategy (torchrun, 2 CPU ranks); never raises for a failed run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = run_dir / "metrics.jsonl"
    command = train_command(args, strategy, metrics)
    info_path = run_dir / "run.json"
    if args.skip_done and (run_dir / "exit_code").is_file() and info_path.is_file():
        try:
            old = json.loads(info_path.read_text())
            if old.get("command") == command and (run_dir / "exit_code").read_text().strip() == "0":
                print(f"[{index}/{total}] {strategy}: finished run with the same command found, re-used", flush=True)
                return load_run(run_dir, strategy)
        except (OSError, json.JSONDecodeError):
            pass
    for stale in ("metrics.jsonl", "exit_code", "train.log", "train.err"):
        (run_dir / stale).unlink(missing_ok=True)
    print(f"[{index}/{total}] {strategy}: training {args.train_iters} iterations "
          f"({' '.join(strategy_flags(strategy))}) -> {run_dir}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads_per_rank), "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p)
    start = time.time()
    timeout = args.run_timeout or 600 + 5 * args.train_iters
    rc: Optional[int] = None
    with open(run_dir / "train.log", "w") as out, open(run_dir / "train.err", "w") as err:
        try:
            proc = subprocess.Popen(command, stdout=out, stderr=err, cwd=REPO, env=env, start_new_session=True)
        except OSError as error:
            err.write(f"cannot start {command[0]}: {error}\n")
            proc = None
            rc = 127
        last_report = start
        while proc is not None and rc is None:
            try:
                rc = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                now = time.time()
                if now - start > timeout:
                    os.killpg(proc.pid, signal.SIGTERM)  # the process group this script started
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
                    err.write(f"\nreproduce_paper.py: killed after {timeout:.0f} s (--run-timeout)\n")
                    rc = 124
                elif now - last_report >= args.progress_interval:
                    done, loss = _count_lines(metrics)
                    rate = done / (now - start)
                    eta = (args.train_iters - done) / rate if rate > 0 else float("nan")
                    print(f"    ... {strategy}: iteration {done}/{args.train_iters}"
                          + (f", loss {loss:.3f}" if loss is not None else "") + f", {now - start:.0f} s elapsed"
                          + (f", ~{eta:.0f} s left" if math.isfinite(eta) else ""), flush=True)
                    last_report = now
    wall = time.time() - start
    (run_dir / "exit_code").write_text(f"{rc}\n")
    info_path.write_text(json.dumps(dict(strategy=strategy, command=command, wall_s=wall, exit_code=rc,
                                         finished=time.strftime("%Y-%m-%d %H:%M:%S")), indent=1))
    run = load_run(run_dir, strategy)
    if run.status == "ok" and len(run.records) < args.train_iters:
        run.status, run.error = "failed", f"only {len(run.records)} of {args.train_iters} iterations in {metrics}"
    if run.status != "ok":
        err = tail(run_dir / "train.err", 200_000)
        print(f"    {strategy} FAILED after {wall:.0f} s: {run.error.splitlines()[0] if run.error else ''}", flush=True)
        for line in error_lines(err):
            print(f"      {line}", flush=True)
        print("    stderr tail:\n" + "\n".join("      " + line for line in err[-2000:].splitlines()[-20:]), flush=True)
        return run
    losses = smooth(run.losses, args.smooth_window)
    surv = token_survival(run.records)
    med = median_iter_time(run.records, args.warmup_iters)
    print(f"    {strategy} done in {wall:.0f} s: smoothed loss {losses[0]:.3f} -> {losses[-1]:.3f} (min "
          f"{min(losses):.3f}), tokens dropped {100 * (1 - surv):.1f}%, median {med:.3f} s/iter, rank max/mean "
          f"{rank_imbalance(run.records, warmup=args.warmup_iters):.2f} "
          f"(static EP on this routing {rank_imbalance(run.records, 'static_tokens_per_rank', args.warmup_iters):.2f})",
          flush=True)
    return run


def sim_settings(args: argparse.Namespace) -> str:
    return (f"megatron_swiftmoe.sim, model {Path(args.sim_config).name}, clusters {PAPER_CLUSTER} and "
            f"{args.h100_cluster}, MFU {args.mfu:g}, capacity factor {CAPACITY_FACTOR:g} (deepspeed, flexmoe-K, "
            "swiftmoe)"
            + (f", planning {args.planning_ms:g} ms/layer/iteration" if args.planning_ms is not None else
               ", SwiftMoE planning time measured on this CPU")
            + (f", first {args.sim_iters} iterations of each trace" if args.sim_iters else ", whole trace")
            + (f", static/deepspeed with EP {args.static_ep} (N*S/E synchronised copies of each expert: the "
               "same experts per GPU as SwiftMoE's slots)" if args.static_ep else
               ", static/deepspeed with EP = gcd(E, N) (one copy of each expert when N divides E)"))


def settings_of(args: argparse.Namespace) -> dict:
    n, s, e = args.ranks, args.slots_per_rank, args.num_experts
    return {
        "model": f"{args.num_layers} layers (all MoE), hidden {args.hidden_size}, ffn {args.ffn_hidden_size or 4 * args.hidden_size}, "
                 f"{args.num_heads} heads, {e} experts top-{args.topk}"
                 + (" (pre-softmax)" if args.topk == 1 else "") + f", aux-loss coefficient {args.aux_loss_coeff:g}, "
                 "no dropout, learned positions, vocabulary 8192 (built-in corpus tokenizer)",
        "data": "built-in corpus (Python standard-library sources), identical sample order for every strategy",
        "batch": f"sequence {args.seq_length}, global batch {args.global_batch_size} "
                 f"(micro-batch {args.micro_batch_size} x {n} ranks x "
                 f"{args.global_batch_size // (args.micro_batch_size * n)} micro-batches)",
        "optimizer": f"AdamW beta 0.9/0.95, weight decay 0.1, clip 1.0, lr {args.lr:g} cosine to {args.lr / 10:g} "
                     f"after {max(1, args.train_iters // 50)} warmup iterations, {args.train_iters} iterations, "
                     f"seed {args.seed}",
        "ranks": f"{n} CPU ranks (torchrun --standalone, gloo), {args.threads_per_rank} thread(s) each",
        "slots": f"S = {s} slots per rank for SwiftMoE/FlexMoE: N*S = {n * s} = {n * s / e:g} E (paper: 16 x 4 = 64 = 4 E)",
        "capacity factor": f"{CAPACITY_FACTOR:g} for deepspeed, flexmoe-K, swiftmoe; none for megatron and swiftmoe-dropless",
        "simulator": sim_settings(args),
        "extra training flags": args.extra_args or "none",
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring (top of this file) for every rule.")
    p.add_argument("--report-dir", default=str(DEFAULT_REPORT_DIR), help="where runs/, report.md, loss_curves.png go")
    p.add_argument("--strategies", default=",".join(STRATEGIES),
                   help=f"comma-separated, from {','.join(STRATEGIES)} (any flexmoe-<K> works)")
    p.add_argument("--reuse", action="store_true",
                   help="train nothing: re-use the metrics under REPORT_DIR/runs/<strategy>/ and only redo the table")
    p.add_argument("--skip-done", action="store_true",
                   help="train, but re-use a strategy's finished run when its command is identical")
    g = p.add_argument_group("training (CPU scale)")
    g.add_argument("--train-iters", type=int, default=500)
    g.add_argument("--hidden-size", type=int, default=64)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 x hidden")
    g.add_argument("--num-layers", type=int, default=2)
    g.add_argument("--num-heads", type=int, default=4)
    g.add_argument("--num-experts", type=int, default=16)
    g.add_argument("--topk", type=int, default=1)
    g.add_argument("--aux-loss-coeff", type=float, default=1e-5)
    g.add_argument("--slots-per-rank", type=int, default=32, help="S; default 32: N*S = 4E with 2 ranks, as the paper")
    g.add_argument("--seq-length", type=int, default=128)
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--global-batch-size", type=int, default=16)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--eval-iters", type=int, default=4, help="validation batches at the end (0: none)")
    g.add_argument("--ranks", type=int, default=2)
    g.add_argument("--threads-per-rank", type=int, default=1)
    g.add_argument("--extra-args", default="", help="more pretrain_gpt flags for every run (one string)")
    g.add_argument("--run-timeout", type=float, default=None, help="seconds per run (default 600 + 5 s x train-iters)")
    g.add_argument("--progress-interval", type=float, default=60, help="seconds between progress lines of a run")
    g = p.add_argument_group("table")
    g.add_argument("--smooth-window", type=int, default=25)
    g.add_argument("--target", type=float, default=None, help="target loss (default: chosen from the runs)")
    g.add_argument("--target-step", type=float, default=0.05)
    g.add_argument("--warmup-iters", type=int, default=10, help="iterations left out of the CPU time median")
    g.add_argument("--sim-config", default=str(DEFAULT_SIM_CONFIG), help="model shape for the simulator")
    g.add_argument("--h100-cluster", default=DEFAULT_H100_CLUSTER, help="simulated H100 cluster (h100-<N>)")
    g.add_argument("--mfu", type=float, default=0.4, help="simulator's achieved fraction of peak FLOP/s")
    g.add_argument("--sim-iters", type=int, default=None,
                   help="simulate only the first N iterations of each trace (long traces; default all)")
    g.add_argument("--planning-ms", type=float, default=None,
                   help="SwiftMoE planning ms per MoE layer and iteration for the simulator (default: measured "
                        "on this CPU by the simulator, which a loaded machine inflates)")
    g.add_argument("--static-ep", type=int, default=None,
                   help="expert-parallel degree of static/deepspeed in the simulator (default gcd(E, N)); "
                        "E / S gives them SwiftMoE's memory layout (the paper's byte identity)")
    g.add_argument("--no-sim", action="store_true", help="skip the simulator (CPU columns only)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in STRATEGY_FLAGS and _flexmoe_interval(s) is None]
    if unknown:
        print(f"error: unknown strategies {unknown}; choose from {', '.join(STRATEGIES)} or flexmoe-<K>",
              file=sys.stderr)
        return 2
    report_dir = Path(args.report_dir)
    (report_dir / "runs").mkdir(parents=True, exist_ok=True)
    settings_path = report_dir / "settings.json"
    started = time.time()
    if args.reuse:
        runs = load_runs(report_dir, strategies)
        settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {
            "settings": "unknown (no settings.json: runs not made by this script); see each run's run.json / log"}
        print(f"re-using runs under {report_dir / 'runs'}: " + ", ".join(f"{k} {r.status}" for k, r in runs.items()))
        for run in runs.values():
            if run.status == "failed":
                lines = run.error.strip().splitlines()
                print(f"  {run.name} failed: " + "\n    ".join(lines[:1] + lines[-15:]))
    else:
        if args.ranks * args.slots_per_rank < args.num_experts:
            print("error: ranks x slots-per-rank must be >= num-experts", file=sys.stderr)
            return 2
        settings = settings_of(args)
        settings_path.write_text(json.dumps(settings, indent=1))
        print("settings:\n" + "\n".join(f"  {k}: {v}" for k, v in settings.items()), flush=True)
        runs = {}
        for i, name in enumerate(strategies, 1):
            runs[name] = run_strategy(args, name, report_dir / "runs" / name, i, len(strategies))
        print(f"training took {(time.time() - started) / 60:.1f} min", flush=True)

    clusters = [] if args.no_sim else [PAPER_CLUSTER, args.h100_cluster]
    settings["simulator"] = "not run (--no-sim)" if args.no_sim else sim_settings(args)
    settings["table"] = (f"{args.smooth_window}-iteration trailing moving average; target "
                         + (f"{args.target:g} (given)" if args.target is not None else
                            f"chosen from the runs, step {args.target_step:g}")
                         + f"; measured s/iter = median after {args.warmup_iters} iterations")
    sim_start = time.time()

    def sim(path: Path, strategy: str, cluster: str) -> dict:
        return simulate_run(path, strategy, cluster, args.sim_config, args.mfu, args.sim_iters, args.planning_ms,
                            args.static_ep)

    table = build_table(runs, smooth_window=args.smooth_window, target=args.target, target_step=args.target_step,
                        warmup=args.warmup_iters, clusters=clusters, simulate=sim)
    common = None
    base = next((runs[n] for n in ("swiftmoe-dropless", "megatron") if n in runs and runs[n].status == "ok"), None)
    if clusters and base is not None:
        try:
            common = dict(trace=f"runs/{base.name}/metrics.jsonl", clusters={
                c: simulate_common(base.metrics_path, c, args.sim_config, args.mfu, args.sim_iters, args.planning_ms,
                                   strategies, args.static_ep)
                for c in clusters})
        except Exception as error:  # noqa: BLE001
            table.notes.append(f"common-trace simulation failed: {type(error).__name__}: {error}")
    if clusters:
        print(f"simulation took {time.time() - sim_start:.0f} s", flush=True)
    paths = write_report(table, report_dir, settings, common)
    print()
    print(format_table(table))
    for line in summary_lines(table):
        print(f"* {line}")
    for note in table.notes:
        print(f"note: {note}")
    print(f"\nreport: {paths['report']}" + (f"\nplot:   {paths['plot']}" if "plot" in paths else "")
          + f"\ntotal {(time.time() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
