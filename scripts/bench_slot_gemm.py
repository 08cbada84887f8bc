#!/usr/bin/env python
"""TFLOP/s of SwiftMoE's expert slots: the grouped kernel (``--swiftmoe-grouped-gemm on``) vs a loop over slots.

First prints what the kernel choice sees on this device (torch, ``torch._grouped_mm``, Transformer
Engine, compute capability) and which kernel ``auto`` and ``on`` pick. Then forward + backward of :class:`SlotExperts` on the current device (CUDA if present), in bf16 on
CUDA and fp32 on CPU, with uneven tokens per slot as SwiftMoE's split produces them. FLOPs
count the three GEMMs of a SwiGLU expert, forward (2 x tokens x params) and backward (twice
that): 6 x tokens x params per step.

    python scripts/bench_slot_gemm.py [--slots 8] [--tokens 32768] [--hidden 1024] [--ffn 4096]

A benchmark: it prints what it measured and asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32768, help="(token, expert) pairs on this rank")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    from megatron.core.transformer import TransformerConfig

    from megatron_swiftmoe.core import compat
    from megatron_swiftmoe.core.experts import GroupedGemmUnavailable, SlotExperts, slot_kernel, slot_platform

    compat.apply()
    device = compat.default_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = TransformerConfig(
        num_layers=1, hidden_size=args.hidden, ffn_hidden_size=args.ffn, moe_ffn_hidden_size=args.ffn,
        num_attention_heads=8, num_moe_experts=args.slots, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, params_dtype=dtype,
        bf16=dtype == torch.bfloat16, use_cpu_initialization=device.type == "cpu",
    )
    # Uneven split, as a skewed routing gives: slot s gets a share proportional to s + 1.
    weights = torch.arange(1, args.slots + 1, dtype=torch.float64)
    per_slot = (weights / weights.sum() * args.tokens).floor().to(torch.int64)
    per_slot[-1] += args.tokens - int(per_slot.sum())
    params = 3 * args.hidden * args.ffn  # fc1 (gate and up, 2F x H) + fc2 (H x F) of one expert
    flops = 6 * args.tokens * params
    platform = slot_platform(device, dtype)
    print(f"kernel choice on {platform.describe()}: torch._grouped_mm "
          f"{'runs' if platform.grouped_mm_works else 'missing' if not platform.has_grouped_mm else 'fails'}"
          f"{' (' + platform.grouped_mm_error + ')' if platform.grouped_mm_error else ''}, Transformer Engine "
          f"{platform.transformer_engine or 'not available'}")
    modes = ["off"]
    for mode in ("auto", "on"):
        try:
            print(f"  --swiftmoe-grouped-gemm {mode}: {slot_kernel(mode, device, dtype).describe()}")
            modes += [mode] if mode == "on" else []
        except GroupedGemmUnavailable as error:
            print(f"  --swiftmoe-grouped-gemm {mode}: {error}")
    print(f"device {device}, {dtype}, {args.slots} slots, {args.tokens} pairs, hidden {args.hidden}, ffn {args.ffn}")
    results = {}
    for mode in modes[::-1]:
        experts = SlotExperts(args.slots, config, num_slots=args.slots, grouped_gemm=mode, device=device)
        with torch.no_grad():
            for param in experts.parameters():
                param.normal_(0, 0.02)
        tokens = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype, requires_grad=True)
        counts = per_slot.to(device)

        def step():
            out, _ = experts(tokens, counts)
            out.float().square().mean().backward()

        for _ in range(3):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.steps
        results[mode] = seconds
        name = slot_kernel(mode, device, dtype).name
        print(f"{name:<20} {seconds * 1000:8.2f} ms/step  {flops / seconds / 1e12:8.3f} TFLOP/s")
    if "on" in results:
        print(f"grouped / loop speed: {results['off'] / results['on']:.2f}x")


if __name__ == "__main__":
    main()
