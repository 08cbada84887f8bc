#!/usr/bin/env python
"""How long the training thread blocks on SwiftMoE's expert collectives, overlap off vs on.

One command, both settings in one run: every rank builds the same GPT-MoE twice (same
weights), one trained with the expert traffic synchronous in the step, one with
``--overlap-grad-reduce`` / ``--overlap-param-gather`` semantics (``core/overlap.py``), and
runs their iterations interleaved (the order alternates), so both see the same machine load.
Per iteration it measures

* the iteration time (the slowest rank's), and
* the time the training stream is blocked on the expert collectives (gradients to the shard
  owners, updated shards to the next placement): around each synchronous collective and each
  wait for an asynchronous one. On CPU (gloo) that is host time; on CUDA (NCCL) it is measured
  with CUDA events recorded on the compute stream around those calls, i.e. how long compute
  waited for the NCCL stream: the exposed expert-communication time. Mean over ranks.

It prints the medians after warm-up, the blocked time as a share of the iteration, and the
on / off ratios. A benchmark, not a test: figures are measured, nothing is asserted.

    python scripts/bench_overlap.py [--nproc 4] [--iters 12] [--warmup 2] [--backend gloo|nccl]

With ``--backend nccl`` every rank uses its own GPU (``scripts/gpu_check.sh`` runs it that way
when the machine has several).
"""

from __future__ import annotations

import argparse
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=4, help="ranks (default 4)")
    parser.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    parser.add_argument("--iters", type=int, default=12, help="measured iterations per setting")
    parser.add_argument("--warmup", type=int, default=2, help="iterations left out of the medians")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=1024, help="expert FFN hidden size")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--slots", type=int, default=4, help="expert slots per rank")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="bf16 model (fp32 masters); default fp32")
    return parser.parse_args(argv)


class _Clock:
    """Accumulates the time the compute stream is blocked: host time on CPU, CUDA events on GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.host_s = 0.0
        self.events: list = []

    def measure(self, call):
        if self.cuda:
            before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            before.record()
            result = call()
            after.record()
            self.events.append((before, after))
            return result
        start = time.perf_counter()
        result = call()
        self.host_s += time.perf_counter() - start
        return result

    def take(self) -> float:
        """Blocked seconds since the last call (synchronises the device first)."""
        if self.cuda:
            torch.cuda.synchronize()
            seconds = sum(before.elapsed_time(after) for before, after in self.events) / 1000
            self.events = []
            return seconds
        seconds, self.host_s = self.host_s, 0.0
        return seconds


class _TimedWork:
    def __init__(self, work, clock: _Clock):
        self.work, self.clock = work, clock

    def wait(self):
        return self.clock.measure(self.work.wait)


def _instrument(shards_list, clock: _Clock) -> None:
    """Time every blocking point of these layers' expert collectives."""
    for shards in shards_list:
        exchange = shards._exchange

        def timed(recv, send, recv_sizes, send_sizes, async_op, exchange=exchange):
            if async_op:  # launching returns at once; the wait is what blocks
                return _TimedWork(exchange(recv, send, recv_sizes, send_sizes, True), clock)
            return clock.measure(lambda: exchange(recv, send, recv_sizes, send_sizes, False))

        shards._exchange = timed


def _build(args, device, overlap: bool):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import Float16Module

    from megatron_swiftmoe.core import compat
    from megatron_swiftmoe.core.config import SwiftMoEConfig
    from megatron_swiftmoe.core.layer import swiftmoe_spec
    from megatron_swiftmoe.core.optimizer import SwiftMoEOptimizer

    compat.manual_seed(1234)  # both models start from the same weights
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    config = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn, num_attention_heads=4,
        num_moe_experts=args.experts, moe_router_topk=args.topk, moe_aux_loss_coeff=1e-2,
        moe_router_load_balancing_type="aux_loss", moe_token_dispatcher_type="allgather", add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, params_dtype=dtype,
        bf16=args.bf16, pipeline_dtype=dtype,
    )
    spec = swiftmoe_spec(get_gpt_layer_local_spec(num_experts=args.experts), SwiftMoEConfig(slots_per_rank=args.slots))
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=1024, max_sequence_length=args.seq)
    if args.bf16:
        model = Float16Module(config, model)
    model = model.to(device)
    optimizer = SwiftMoEOptimizer(model, lr=1e-4, overlap_grad_reduce=overlap, overlap_param_gather=overlap)
    return model, optimizer


def _iteration(model, optimizer, args, step: int, rank: int, device) -> None:
    optimizer.zero_grad()
    generator = torch.Generator().manual_seed(10_000 * step + rank)
    for micro in range(args.micro_batches):
        tokens = torch.randint(0, 1024, (args.micro_batch_size, args.seq + 1), generator=generator).to(device)
        positions = torch.arange(args.seq, device=device).unsqueeze(0).expand(args.micro_batch_size, -1)
        with optimizer.no_sync() if micro < args.micro_batches - 1 else torch.enable_grad():
            logits = model(tokens[:, :-1], positions, None)
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                     tokens[:, 1:].reshape(-1))
            (loss / args.micro_batches).backward()
    optimizer.step()


def _worker(rank: int, args: argparse.Namespace, port: int, results: str) -> None:
    warnings.filterwarnings("ignore")  # optional GPU extras missing, torch's renamed collectives
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if args.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend, rank=rank, world_size=args.nproc, timeout=datetime.timedelta(minutes=10))
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_swiftmoe.core import compat

    compat.apply()
    parallel_state.initialize_model_parallel()
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / args.micro_batches, device=device))
    runs = {}
    for name, overlap in (("off", False), ("on", True)):
        model, optimizer = _build(args, device, overlap)
        clock = _Clock(device)
        _instrument(optimizer.expert_shards, clock)
        runs[name] = (model, optimizer, clock)
    figures = {name: [] for name in runs}
    for step in range(args.warmup + args.iters):
        order = list(runs) if step % 2 == 0 else list(runs)[::-1]
        for name in order:
            model, optimizer, clock = runs[name]
            dist.barrier()
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            _iteration(model, optimizer, args, step, rank, device)
            blocked = clock.take()  # synchronises the device
            figures[name].append((time.perf_counter() - start, blocked))
    for _, optimizer, _ in runs.values():
        optimizer.finish_param_sync()
    gathered = [None] * args.nproc
    dist.all_gather_object(gathered, figures)
    if rank == 0:
        torch.save(gathered, results)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.backend == "nccl" and torch.cuda.device_count() < args.nproc:
        sys.exit(f"--backend nccl --nproc {args.nproc} needs {args.nproc} GPUs, found {torch.cuda.device_count()}")
    results = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_overlap_{os.getpid()}.pt"
    mp.start_processes(_worker, args=(args, _free_port(), str(results)), nprocs=args.nproc, start_method="spawn")
    per_rank = torch.load(results, weights_only=False)
    results.unlink()

    def medians(name: str) -> tuple[float, float, float]:
        iteration, blocked, share = [], [], []
        for step in range(args.warmup, args.warmup + args.iters):
            times = [figures[name][step] for figures in per_rank]
            iteration.append(max(t for t, _ in times))
            blocked.append(statistics.mean(b for _, b in times))
            share.append(blocked[-1] / iteration[-1])
        return statistics.median(iteration), statistics.median(blocked), statistics.median(share)

    device = "GPUs, NCCL" if args.backend == "nccl" else "CPU processes, gloo"
    print(f"{args.nproc} ranks ({device}), {args.layers} SwiftMoE layers (E={args.experts}, top-{args.topk}, "
          f"S={args.slots}), hidden {args.hidden}, expert ffn {args.ffn}, {'bf16' if args.bf16 else 'fp32'}; "
          f"{args.micro_batches} micro-batches x {args.micro_batch_size} x {args.seq} tokens per rank; medians of "
          f"{args.iters} iterations after {args.warmup} warm-up, settings interleaved")
    print(f"{'expert traffic':<16}{'iteration ms':>14}{'blocked on expert collectives ms':>35}{'share':>9}")
    figures = {name: medians(name) for name in ("off", "on")}
    for name, label in (("off", "synchronous"), ("on", "overlapped")):
        iteration, blocked, share = figures[name]
        print(f"{label:<16}{1000 * iteration:>14.1f}{1000 * blocked:>35.2f}{100 * share:>8.1f}%")
    (it_off, bl_off, _), (it_on, bl_on, _) = figures["off"], figures["on"]
    print(f"overlapped / synchronous: blocked time {bl_on / bl_off:.2f}x, iteration time {it_on / it_off:.2f}x")


if __name__ == "__main__":
    main()
