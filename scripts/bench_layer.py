"""Benchmark one SwiftMoE layer against Megatron's stock MoELayer, forward + backward.

What is measured
    One command launches N ranks (default 2, gloo on CPU, NCCL on GPUs). Every rank builds

    * stock:    Megatron-Core's ``MoELayer`` (SequentialMLP experts, allgather dispatcher, or
                alltoall on CUDA) with expert_model_parallel_size = N: E/N experts per rank;
    * SwiftMoE: ``SwiftMoELayer`` with S slots per rank (default S = E/N, the same expert
                memory as static EP), replicating experts over the same N ranks.

    Both use the same router spec and the same router weights, the same expert sizes,
    bias-free experts, no aux loss, and take the same input. Router weights and inputs are
    crafted so that routing is exactly what the scenario asks for:

    * balanced: every expert receives T*k/E (token, expert) pairs;
    * skewed:   expert 0 is chosen by a fraction --hot-fraction (default 1/2) of all tokens,
                the other experts share the remaining choices evenly (with top-k, expert 0
                then gets hot_fraction / k of the pairs).

    The measured tokens per expert (from the router's routing_map) are printed, and the run
    stops with an error if the two layers' routers did not route identically.

    SwiftMoE plans its placement from the popularity of the previous step (normally in
    ``SwiftMoEOptimizer.step``). Here one warm-up forward + backward measures the popularity and
    the planned placement is installed directly; slot weights are not rewritten (their values
    do not affect timing). Then both layers run R timed forward + backward passes, interleaved
    (stock, swift, stock, swift, ...) so that machine noise hits both. A pass is timed on every
    rank between barriers; the slowest rank defines the step, and the reported time is the
    median over repetitions of that per-repetition maximum. On CPU the process CPU time of
    each pass is reported too (same statistics): on a shared machine wall time also counts the
    time other processes took from a rank, CPU time does not, so when the two disagree,
    check the load average printed at the start and the end.

How to read it
    "rank load" is the number of (token, expert) pairs each rank's experts computed; max/mean
    is the imbalance (1.0 = perfect). ``ratio = stock_ms / swiftmoe_ms``: above 1 SwiftMoE is
    faster. Targets (from the issue): ratio >= 0.95 when balanced (SwiftMoE within 5% of
    stock) and ratio >= 1.3 when skewed. They are reported as met or missed; they never change
    the exit status, which is non-zero only on errors.

    SwiftMoE needs spare slots (N*S > E) to replicate a hot expert; the default gives it
    S = 1.5 E/N (6 slots for 8 experts on 2 ranks, as configs/tiny_cpu.yaml; the paper used
    N*S = 4E). With --slots-per-rank E/N every expert has exactly one slot and SwiftMoE can
    only re-place experts, not split a hot one.

    python scripts/bench_layer.py                       # E=8, top-1, 2 ranks, 1 thread each
    python scripts/bench_layer.py --topk 2 --slots-per-rank 4
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import socket
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Known, irrelevant noise: megatron-core without TE/Apex, and torch's renamed collectives.
for _message in ("Transformer Engine and Apex are not installed", "Apex is not installed",
                 "full scope is deprecated", "`torch.distributed.* is deprecated"):
    warnings.filterwarnings("ignore", message=f".*{_message}")

SCENARIOS = ("balanced", "skewed")
TARGETS = {"balanced": 0.95, "skewed": 1.3}
TIMEOUT_S = 900


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, default=2, help="processes (one per GPU on CUDA)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=1)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=1024, help="expert FFN hidden size")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank (seq x batch)")
    p.add_argument("--slots-per-rank", type=int, default=None, help="SwiftMoE slots S (default ceil(1.5 E/N))")
    p.add_argument("--placement", choices=("balanced", "contiguous"), default="balanced")
    p.add_argument("--replica-counts", choices=("load", "paper"), default="load", help="SwiftMoE replica count rule")
    p.add_argument("--split", choices=("rank", "replica"), default="rank",
                   help="SwiftMoE split of each expert's pairs among its replicas")
    p.add_argument("--hot-fraction", type=float, default=0.5, help="share of tokens routed to expert 0 when skewed")
    p.add_argument("--dispatcher", choices=("allgather", "alltoall"), default="allgather",
                   help="stock dispatcher (alltoall needs CUDA)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--warmup", type=int, default=2, help="untimed passes per layer after planning")
    p.add_argument("--reps", type=int, default=20, help="timed passes per layer")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    if args.slots_per_rank is None:
        args.slots_per_rank = -(-3 * args.experts // (2 * args.ranks))
    if args.experts % args.ranks:
        p.error(f"--experts ({args.experts}) must be divisible by --ranks ({args.ranks}) for the stock layer")
    if not 1 <= args.topk < args.experts:
        p.error("--topk must be in [1, experts)")
    if not 0.0 <= args.hot_fraction <= 1.0:
        p.error("--hot-fraction must be in [0, 1]")
    if args.dispatcher == "alltoall" and not torch.cuda.is_available():
        p.error("the alltoall dispatcher needs CUDA streams; use --dispatcher allgather on CPU")
    return args


# --------------------------------------------------------------------------------------------
# Models and routing
# --------------------------------------------------------------------------------------------


def build_layers(args, device):
    """The stock MoELayer (EP = N) and the SwiftMoELayer (EP = 1, S slots), same router spec."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.spec_utils import build_module

    from megatron_swiftmoe.core.config import SwiftMoEConfig
    from megatron_swiftmoe.core.layer import SwiftMoELayer

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    config = TransformerConfig(
        num_layers=1,
        hidden_size=args.hidden,
        ffn_hidden_size=args.ffn,
        moe_ffn_hidden_size=args.ffn,
        num_attention_heads=max(1, args.hidden // 64),
        num_moe_experts=args.experts,
        moe_router_topk=args.topk,
        moe_router_pre_softmax=args.topk == 1,  # Megatron requires it for top-1 softmax
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type=args.dispatcher,
        expert_model_parallel_size=args.ranks,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=device.type == "cpu",
    )
    mlp_spec = get_gpt_layer_local_spec(num_experts=args.experts, moe_grouped_gemm=False).submodules.mlp
    stock = build_module(mlp_spec, config=config).to(device)

    swift_config = copy.copy(config)
    swift_config.expert_model_parallel_size = 1
    swiftmoe = SwiftMoEConfig(slots_per_rank=args.slots_per_rank, placement=args.placement,
                              replica_counts=args.replica_counts, split=args.split)
    swift = SwiftMoELayer(swift_config, submodules=mlp_spec.submodules, swiftmoe=swiftmoe).to(device)
    return stock, swift


def router_directions(args, device) -> torch.Tensor:
    """``[E, H]`` orthonormal rows, the same on every rank: the router weight of both layers."""
    gen = torch.Generator().manual_seed(args.seed)
    q, _ = torch.linalg.qr(torch.randn(args.hidden, args.experts, generator=gen, dtype=torch.float64))
    return q.T.contiguous().to(device)


def choose_experts(args, scenario: str, rank: int) -> torch.Tensor:
    """``[T, k]`` distinct experts per token, in preference order (first = highest logit)."""
    T, E, k = args.tokens, args.experts, args.topk
    t = torch.arange(T)
    if scenario == "balanced":
        # Consecutive experts from a cyclic start: each expert gets exactly T*k/E when E | T.
        chosen = (t[:, None] + torch.arange(k)[None]) % E
    else:
        # The first `hot` tokens pick expert 0 first; everything else cycles over experts 1..E-1.
        hot = round(args.hot_fraction * T)
        cold = (t[:, None] + torch.arange(k)[None]) % (E - 1) + 1
        first = torch.where(t < hot, 0, cold[:, 0])
        rest = torch.where((t < hot)[:, None], cold[:, : k - 1], cold[:, 1:])
        chosen = torch.cat([first[:, None], rest], 1)
    gen = torch.Generator().manual_seed(args.seed + 1000 * rank + SCENARIOS.index(scenario))
    return chosen[torch.randperm(T, generator=gen)]


def make_input(args, scenario: str, rank: int, directions: torch.Tensor, dtype) -> torch.Tensor:
    """Tokens ``[T, 1, H]``: Gaussian noise outside the router's subspace plus a routing signal.

    The signal gives the j-th chosen expert logit 4*(k - j) and every other expert 0, so the
    top-k selection is exactly ``choose_experts`` (no tie can flip it).
    """
    gen = torch.Generator().manual_seed(args.seed + 7919 * (rank + 1) + SCENARIOS.index(scenario))
    U = directions.cpu()
    noise = torch.randn(args.tokens, args.hidden, generator=gen, dtype=torch.float64)
    noise -= (noise @ U.T) @ U  # no component along any router row
    chosen = choose_experts(args, scenario, rank)
    strength = 4.0 * torch.arange(args.topk, 0, -1, dtype=torch.float64)
    signal = torch.zeros(args.tokens, args.experts, dtype=torch.float64)
    signal.scatter_(1, chosen, strength.expand_as(chosen).clone())
    x = noise + signal @ U
    return x.to(device=directions.device, dtype=dtype).view(args.tokens, 1, args.hidden)


class Recorder:
    """Forward hooks that keep what the router chose and what the experts computed."""

    def __init__(self, layer):
        self.routing_map = None
        self.expert_tokens = None
        layer.router.register_forward_hook(self._router)
        layer.experts.register_forward_pre_hook(self._experts)

    def _router(self, module, inputs, output):
        self.routing_map = output[1].detach()

    def _experts(self, module, inputs):
        self.expert_tokens = inputs[1]  # tokens per local expert / slot; summed after timing


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def fwd_bwd(layer, x: torch.Tensor, grad: torch.Tensor, device) -> tuple[float, float]:
    """One forward + backward between barriers: this rank's (wall ms, process CPU ms)."""
    layer.zero_grad(set_to_none=True)
    x.grad = None
    dist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    output, _ = layer(x)
    output.backward(grad)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = (time.perf_counter() - start) * 1e3, (time.process_time() - cpu_start) * 1e3
    dist.barrier()
    return wall, cpu


def gather(value) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def run_scenario(args, scenario: str, stock, swift, rec_stock, rec_swift, directions, device, dtype) -> dict:
    from megatron_swiftmoe.core.layer import plan_placement
    from megatron_swiftmoe.core.placement import rank_loads

    rank = dist.get_rank()
    x = make_input(args, scenario, rank, directions, dtype).requires_grad_()
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(args.seed + rank), dtype=torch.float32)
    grad = grad.to(device=device, dtype=dtype)

    # Popularity from one pass, then the placement the optimizer would install for the next step.
    swift.step_popularity.zero_()
    fwd_bwd(swift, x, grad, device)
    popularity = swift.step_popularity.clone()
    swift.set_placement(plan_placement(popularity, args.ranks, swift.swiftmoe))
    swift.step_popularity.zero_()

    for _ in range(args.warmup):
        fwd_bwd(stock, x, grad, device)
        fwd_bwd(swift, x, grad, device)
    times = {"stock": [], "swift": []}
    for _ in range(args.reps):  # interleaved: stock, swift, stock, swift, ...
        times["stock"].append(fwd_bwd(stock, x, grad, device))
        times["swift"].append(fwd_bwd(swift, x, grad, device))

    # Same router weights and input: both layers must have routed identically.
    local_counts = rec_stock.routing_map.sum(0).to(torch.int64)
    if not torch.equal(rec_stock.routing_map, rec_swift.routing_map):
        raise RuntimeError(f"{scenario}: the two routers disagree; the comparison would be invalid")
    counts = local_counts.clone()
    dist.all_reduce(counts)

    per_rank = gather(
        {
            "stock_ms": [wall for wall, _ in times["stock"]],
            "swift_ms": [wall for wall, _ in times["swift"]],
            "stock_cpu_ms": [cpu for _, cpu in times["stock"]],
            "swift_cpu_ms": [cpu for _, cpu in times["swift"]],
            "stock_tokens": int(rec_stock.expert_tokens.sum()),
            "swift_tokens": int(swift.token_dispatcher.last_tokens_per_slot.sum()),
        }
    )
    result = {
        "scenario": scenario,
        "counts": counts.cpu().tolist(),
        "placement": swift.placement.cpu().tolist(),
        "expected_swift_load": rank_loads(popularity.cpu(), swift.placement.cpu()).tolist(),
    }
    for name in ("stock", "swift"):
        # Per repetition the slowest rank defines the step; then the median over repetitions.
        step_ms = [max(r[f"{name}_ms"][i] for r in per_rank) for i in range(args.reps)]
        step_cpu_ms = [max(r[f"{name}_cpu_ms"][i] for r in per_rank) for i in range(args.reps)]
        tokens = [r[f"{name}_tokens"] for r in per_rank]
        result[name] = {
            "tokens": tokens,
            "imbalance": max(tokens) / statistics.mean(tokens),
            "median_ms": statistics.median(step_ms),
            "min_ms": min(step_ms),
            "max_ms": max(step_ms),
            "rank_median_ms": [statistics.median(r[f"{name}_ms"]) for r in per_rank],
            "cpu_ms": statistics.median(step_cpu_ms),
            "rank_cpu_ms": [statistics.median(r[f"{name}_cpu_ms"]) for r in per_rank],
        }
    result["ratio"] = result["stock"]["median_ms"] / result["swift"]["median_ms"]
    result["cpu_ratio"] = result["stock"]["cpu_ms"] / result["swift"]["cpu_ms"]
    return result


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def print_environment(args, device, backend) -> None:
    import megatron.core

    n, s, e = args.ranks, args.slots_per_rank, args.experts
    print("== environment")
    print(f"torch {torch.__version__}, megatron-core {megatron.core.__version__}, python {sys.version.split()[0]}")
    print(f"device {device.type}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    + f", backend {backend}, ranks {n}, torch threads per rank {torch.get_num_threads()}, "
      f"cpu cores {os.cpu_count()}")
    print(f"layer: E={e} experts, top-{args.topk}, hidden {args.hidden}, ffn {args.ffn}, {args.dtype}, "
          f"{args.tokens} tokens/rank, no bias, no aux loss")
    print(f"stock: MoELayer, SequentialMLP, {args.dispatcher} dispatcher, EP={n} ({e // n} experts/rank)")
    print(f"swiftmoe: SwiftMoELayer, S={s} slots/rank ({n * s} slots for {e} experts), "
          f"placement '{args.placement}', replica counts '{args.replica_counts}', split '{args.split}', "
          f"replicated over the {n} data-parallel ranks")
    if n * s == e:
        print("  note: N*S == E, one slot per expert: SwiftMoE can re-place but not replicate experts")
    print("  placement planned from a warm-up pass; slot weights are not rewritten (values do not affect timing)")
    print(f"timing: {args.warmup} warm-up + {args.reps} timed fwd+bwd per layer, interleaved; "
          "per repetition the slowest rank, median over repetitions")
    if device.type == "cpu":
        print("  cpu ms = process CPU time of the pass (same statistics): unlike wall time it leaves out "
              "time other processes took from this rank")
        print(f"  system load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")


def print_scenario(r: dict, show_cpu: bool) -> None:
    print(f"\n== {r['scenario']}")
    total = sum(r["counts"])
    shares = ", ".join(f"{c} ({100 * c / total:.1f}%)" for c in r["counts"])
    print(f"tokens per expert (global, {total} pairs): {shares}")
    print(f"swiftmoe placement (expert per slot, rank by rank): {r['placement']}")
    expected = ", ".join(f"{v:.0f}" for v in r["expected_swift_load"])
    print(f"swiftmoe planned rank loads from popularity: {expected}")
    for name, label in (("stock", "stock   "), ("swift", "swiftmoe")):
        m = r[name]
        ranks = ", ".join(str(t) for t in m["tokens"])
        rank_ms = ", ".join(f"{t:.1f}" for t in m["rank_median_ms"])
        print(f"{label}: rank load [{ranks}] max/mean {m['imbalance']:.3f} | "
              f"{m['median_ms']:.1f} ms median (min {m['min_ms']:.1f}, max {m['max_ms']:.1f}; "
              f"per-rank medians [{rank_ms}])")
        if show_cpu:
            rank_cpu = ", ".join(f"{t:.1f}" for t in m["rank_cpu_ms"])
            print(f"{'':10}cpu {m['cpu_ms']:.1f} ms median (per-rank medians [{rank_cpu}])")
    target = TARGETS[r["scenario"]]
    met = "met" if r["ratio"] >= target else "NOT met"
    print(f"ratio stock/swiftmoe = {r['ratio']:.3f} (target >= {target}: {met})"
          + (f"; by cpu time {r['cpu_ratio']:.3f}" if show_cpu else ""))


def print_summary(results: list[dict], show_cpu: bool) -> None:
    print("\n== summary (ratio = stock ms / swiftmoe ms, wall time; > 1 means SwiftMoE faster)")
    head = (f"{'scenario':<9} {'load max/mean stock':>19} {'swift':>6} {'stock ms':>9} {'swift ms':>9} "
            f"{'ratio':>6}" + (f" {'cpu ratio':>9}" if show_cpu else "") + "  target")
    print(head)
    print("-" * len(head))
    for r in results:
        target = TARGETS[r["scenario"]]
        met = "met" if r["ratio"] >= target else "NOT met"
        print(f"{r['scenario']:<9} {r['stock']['imbalance']:>19.3f} {r['swift']['imbalance']:>6.3f} "
              f"{r['stock']['median_ms']:>9.1f} {r['swift']['median_ms']:>9.1f} {r['ratio']:>6.3f}"
              + (f" {r['cpu_ratio']:>9.3f}" if show_cpu else "")
              + f"  >= {target}: {met}")


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


def worker(rank: int, args: argparse.Namespace, port: int) -> None:
    from megatron.core import parallel_state

    from megatron_swiftmoe.core import compat

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    if torch.cuda.is_available():
        torch.cuda.set_device(rank % torch.cuda.device_count())
    backend = compat.default_backend()
    dist.init_process_group(
        backend, rank=rank, world_size=args.ranks, timeout=datetime.timedelta(seconds=TIMEOUT_S)
    )
    try:
        compat.apply()
        parallel_state.initialize_model_parallel(expert_model_parallel_size=args.ranks)
        compat.manual_seed(args.seed)
        device = compat.default_device()
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

        stock, swift = build_layers(args, device)
        directions = router_directions(args, device)
        with torch.no_grad():
            for layer in (stock, swift):
                layer.router.weight.copy_(directions.to(layer.router.weight.dtype))
        stock.train()
        swift.train()
        rec_stock, rec_swift = Recorder(stock), Recorder(swift)

        if rank == 0:
            print_environment(args, device, backend)
        results = []
        for scenario in SCENARIOS:
            result = run_scenario(args, scenario, stock, swift, rec_stock, rec_swift, directions, device, dtype)
            results.append(result)
            if rank == 0:
                print_scenario(result, device.type == "cpu")
                sys.stdout.flush()
        if rank == 0:
            print_summary(results, device.type == "cpu")
            if device.type == "cpu":
                print(f"system load average at end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv=None) -> int:
    args = parse_args(argv)
    if torch.cuda.is_available() and args.ranks > torch.cuda.device_count():
        print(f"error: --ranks {args.ranks} > {torch.cuda.device_count()} GPUs", file=sys.stderr)
        return 2
    try:
        mp.start_processes(worker, args=(args, free_port()), nprocs=args.ranks, start_method="spawn")
    except mp.ProcessRaisedException as exc:
        print(f"error: a rank failed:\n{exc}", file=sys.stderr)
        return 1
    except mp.ProcessExitedException as exc:
        print(f"error: a rank exited: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
