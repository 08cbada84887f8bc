"""What the plugin says, and checks, when a Megatron-LM run starts with ``--swiftmoe``.

* :func:`announce`: one line (rank 0) confirming that SwiftMoE is on: MoE layers, slots, ranks,
  replica and split rules, and the expert kernel the slots compute with.
* :func:`hide_unknown_mlp_notice`: Megatron's ``TransformerLayer`` warns "Unknown MLP type ...
  Using default kwargs" for every layer whose MLP is not its own class; with ``--swiftmoe`` that
  is every SwiftMoE layer, and nothing is wrong. The notice is dropped while ``--swiftmoe`` is on,
  from that one logger only.
* :func:`missing_data_paths`: ``--data-path`` prefixes without their ``.bin`` / ``.idx``, found
  while checking the arguments, before any process group (Megatron itself finds out when it
  builds the datasets, after the process groups, in every rank's traceback).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Callable

_UNKNOWN_MLP_LOGGER = "megatron.core.transformer.transformer_layer"


def hide_unknown_mlp_notice(active: Callable[[], bool]) -> None:
    """Drop Megatron's "Unknown MLP type" notice while ``active()`` (idempotent)."""
    logger = logging.getLogger(_UNKNOWN_MLP_LOGGER)
    if any(getattr(f, "swiftmoe", False) for f in logger.filters):
        return

    def keep(record: logging.LogRecord) -> bool:
        return not (active() and record.getMessage().startswith("Unknown MLP type"))

    keep.swiftmoe = True
    logger.addFilter(keep)


def missing_data_paths(args) -> list[str]:
    """Dataset prefixes named by ``--data-path`` / ``--{train,valid,test}-data-path`` whose
    ``PREFIX.bin`` or ``PREFIX.idx`` does not exist (blend weights and object-store URLs skipped)."""
    if getattr(args, "mock_data", False):
        return []
    entries = []
    for name in ("data_path", "train_data_path", "valid_data_path", "test_data_path"):
        entries += getattr(args, name, None) or []
    prefixes = [p for entry in entries for p in str(entry).split() if not re.fullmatch(r"[0-9.eE+-]+", p)]
    return [p for p in prefixes if "://" not in p
            and not (os.path.isfile(p + ".bin") and os.path.isfile(p + ".idx"))]


def announce(model_chunks, args) -> None:
    """Rank 0: the line that says SwiftMoE is on, and how."""
    import torch

    from megatron_swiftmoe.core.layer import swiftmoe_layers
    from megatron_swiftmoe.megatron_lm.arguments import replica_group_size

    if torch.distributed.get_rank() != 0:
        return
    layers = swiftmoe_layers(model_chunks)
    stage = (f" on pipeline stage 1 of {args.pipeline_model_parallel_size}"
             if args.pipeline_model_parallel_size > 1 else "")
    kernel = layers[0].experts.kernel().describe() if layers else "none on this stage"
    replica_ranks = f"{args.data_parallel_size} data-parallel ranks"
    if args.tensor_model_parallel_size * args.context_parallel_size > 1:
        replica_ranks = (f"{replica_group_size(args)} tensor x context x data-parallel ranks "
                         f"({args.tensor_model_parallel_size} x {args.context_parallel_size} x {args.data_parallel_size})")
    overlapped = [what for flag, what in ((args.overlap_grad_reduce, "gradient reduction with backward"),
                                          (args.overlap_param_gather, "re-placement with the next forward")) if flag]
    traffic = f"overlapped ({', '.join(overlapped)})" if overlapped else "in the step"
    print(
        f"> SwiftMoE on: {len(layers)} MoE layers{stage}, {args.num_experts} experts in "
        f"{args.swiftmoe_slots_per_rank} slots per rank x {replica_ranks}, "
        f"replica counts {args.swiftmoe_replica_counts}, placement {args.swiftmoe_placement}, "
        f"split {args.swiftmoe_split}, expert kernel: {kernel}, expert traffic: {traffic}",
        flush=True,
    )
