"""The ``--swiftmoe*`` flags in Megatron-LM's parser, and their validation.

The flag group is the same as this project's trainer's (:func:`add_swiftmoe_arguments`).
:func:`validate` runs inside Megatron's ``validate_args``, before any process group exists:
a setting SwiftMoE cannot honour stops the job there with a message naming the flag and the
fix; settings that SwiftMoE replaces are rewritten with a notice.
"""

from __future__ import annotations

import os

from megatron_swiftmoe.core.config import swiftmoe_config_from_args
from megatron_swiftmoe.core.experts import grouped_gemm_problem
from megatron_swiftmoe.megatron_lm import startup


class SwiftMoEArgumentError(SystemExit):
    """A Megatron-LM setting SwiftMoE cannot run with (exits with status 2)."""

    def __init__(self, message: str):
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: --swiftmoe: {message}", flush=True)
        super().__init__(2)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _notice(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"> SwiftMoE: {message}", flush=True)


# Settings that must keep their default with --swiftmoe: (attribute, allowed values, why / fix).
_UNSUPPORTED = (
    ("add_bias_linear", (False,), "SwiftMoE's experts are bias-free: add --disable-bias-linear"),
    ("moe_pad_expert_input_to_capacity", (False, None), "SwiftMoE never pads expert inputs; drop the flag"),
    ("moe_latent_size", (None, 0), "latent MoE is not supported with SwiftMoE"),
    ("overlap_moe_expert_parallel_comm", (False, None), "it calls the MoE layer's dispatch pieces from its own "
     "schedule, around Megatron's all-to-all dispatcher; SwiftMoE's plan and all-to-alls are not wired into it: "
     "drop the flag (--moe-shared-expert-overlap works)"),
    ("spec", (None,), "SwiftMoE swaps its layer into Megatron's GPT decoder block spec; drop --spec"),
    ("use_torch_fsdp2", (False,), "SwiftMoE needs Megatron's DDP for the dense parameters; drop the flag"),
    ("use_megatron_fsdp", (False,), "SwiftMoE needs Megatron's DDP for the dense parameters; drop the flag"),
    ("num_distributed_optimizer_instances", (1,), "SwiftMoE's expert shards span the whole data-parallel group; use 1"),
    ("optimizer", ("adam",), "SwiftMoE's expert optimizer is Adam/AdamW; use --optimizer adam"),
    ("ckpt_format", ("torch", "torch_dist"), "SwiftMoE saves with --ckpt-format torch or torch_dist"),
    ("cuda_graph_impl", (None, "none"), "CUDA graphs are not supported with SwiftMoE (its split sizes change every step)"),
    ("enable_cuda_graph", (False, None), "CUDA graphs are not supported with SwiftMoE (its split sizes change every step)"),
    ("data_parallel_random_init", (False,), "SwiftMoE's expert shards need the same initial experts on every rank"),
    ("moe_use_upcycling", (False,), "upcycling into SwiftMoE layers is not supported; upcycle first, then resume with --swiftmoe"),
    ("use_legacy_models", (False,), "SwiftMoE plugs into Megatron-Core models only"),
)


def validate_before(args) -> None:
    """Checks and rewrites before Megatron's own ``validate_args`` (no process group yet)."""
    if not getattr(args, "swiftmoe", False):
        return
    if not args.num_experts:
        raise SwiftMoEArgumentError("needs an MoE model: add --num-experts E")
    for name, allowed, why in _UNSUPPORTED:
        value = getattr(args, name, allowed[0])
        if value not in allowed:
            raise SwiftMoEArgumentError(f"{_flag(name)} {value!r} is not supported: {why}")
    try:
        swiftmoe_config_from_args(args)
    except ValueError as error:
        raise SwiftMoEArgumentError(str(error)) from None
    if missing := startup.missing_data_paths(args):
        raise SwiftMoEArgumentError(
            f"--data-path: no {' / '.join(p + '.bin/.idx' for p in missing)}: each prefix needs PREFIX.bin and "
            "PREFIX.idx (Megatron's preprocess_data.py writes them); in a container, mount their directory "
            "(scripts/slurm/megatron_lm.sbatch mounts those of --data-path, --save and --load)"
        )
    if args.expert_model_parallel_size != 1:
        _notice(
            f"--expert-model-parallel-size {args.expert_model_parallel_size} replaced by 1: SwiftMoE places "
            f"--swiftmoe-slots-per-rank {args.swiftmoe_slots_per_rank} expert replicas on every data-parallel rank "
            "instead of partitioning the experts"
        )
        args.expert_model_parallel_size = 1
    expert_tp = args.expert_tensor_parallel_size or args.tensor_model_parallel_size  # Megatron's default: TP
    if expert_tp != 1:
        _notice(
            f"--expert-tensor-parallel-size {expert_tp} replaced by 1: SwiftMoE keeps every expert whole in its "
            "slots; the tensor-parallel ranks route their own sequence slices to the replicas (MoE parallel folding)"
        )
    args.expert_tensor_parallel_size = 1
    if getattr(args, "moe_grouped_gemm", False):
        _notice(
            f"--moe-grouped-gemm: SwiftMoE's slots compute with --swiftmoe-grouped-gemm "
            f"{args.swiftmoe_grouped_gemm} (auto: Transformer Engine's grouped GEMM where installed, else "
            "torch._grouped_mm where fast, else a loop; the 'SwiftMoE on' line names the kernel)"
        )
        # Megatron's static grouped experts are never built: its check of their GPU (and of their
        # kernels' packages) is skipped, then the flag is restored for the model's config
        # (validate_after), whose own checks need it (--recompute-modules moe_act).
        args.moe_grouped_gemm = False
        args.swiftmoe_restore_moe_grouped_gemm = True
    # SwiftMoE's dispatcher applies the capacity factor per replica slot, not Megatron's layers.
    args.swiftmoe_capacity_factor = args.moe_expert_capacity_factor
    args.moe_expert_capacity_factor = None


def swiftmoe_config(args):
    """The run's :class:`SwiftMoEConfig` (after :func:`validate_before`)."""
    return swiftmoe_config_from_args(args, capacity_factor=args.swiftmoe_capacity_factor)


def replica_group_size(args) -> int:
    """Ranks that share a layer's expert slots: tensor x context x data-parallel ranks of a stage."""
    return args.tensor_model_parallel_size * args.context_parallel_size * args.data_parallel_size


def validate_after(args) -> None:
    """Checks that need Megatron's derived settings (``data_parallel_size``)."""
    if not getattr(args, "swiftmoe", False):
        return
    if getattr(args, "swiftmoe_restore_moe_grouped_gemm", False):
        args.moe_grouped_gemm = True
    n, slots, experts = replica_group_size(args), args.swiftmoe_slots_per_rank, args.num_experts
    ranks = f"{n} data-parallel ranks" if n == args.data_parallel_size else (
        f"{n} tensor x context x data-parallel ranks ({args.tensor_model_parallel_size} x "
        f"{args.context_parallel_size} x {args.data_parallel_size})")
    if n * slots < experts:
        need = -(-experts // n)
        raise SwiftMoEArgumentError(
            f"--swiftmoe-slots-per-rank {slots} x {ranks} = {n * slots} slots is fewer than "
            f"--num-experts {experts}: every expert needs a slot; use --swiftmoe-slots-per-rank >= {need} or more ranks"
        )
    if not 1 <= args.moe_router_topk <= experts:
        raise SwiftMoEArgumentError(f"--moe-router-topk {args.moe_router_topk} must be in [1, --num-experts {experts}]")
    if problem := grouped_gemm_problem(args.swiftmoe_grouped_gemm, args.params_dtype):
        raise SwiftMoEArgumentError(problem)
