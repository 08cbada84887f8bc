"""SwiftMoE trains exactly like the unreplicated model.

A GPTModel with SwiftMoE layers on N gloo ranks (N = 1..4, top-1/top-2, S = 1..4, skewed
routing so placements change) is compared with a single-process reference: Megatron's stock
MoELayer holding all experts, plain ``torch.optim.AdamW``, the same initial weights and the
same global batches (the reference runs every rank's micro-batches in turn and accumulates).

Precision and tolerance: both sides run in fp64 and differ only in the order of floating-point
operations (per-token sums of top-k outputs, replica gradients summed across ranks,
probabilities applied after fc2 instead of inside the MLP, GEMM blocking for other token
counts, sharded reductions). Most cases then agree to ~1e-14. Megatron's router, however,
always computes its softmax in fp32: a 1e-16 difference in its input can flip one fp32
rounding (~6e-8 relative) of a routing probability, and AdamW's first updates
(~lr * g / |g| for gradients near eps) amplify that to at most a few 1e-6 at lr = 1e-2.
Hence ATOL = 1e-5 on weights and 1e-7 on losses. A real bug moves weights by ~lr: the
negative control below double-counts one replica's gradient once and must fail by > 100x ATOL.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from megatron_swiftmoe.core.config import SwiftMoEConfig
from megatron_swiftmoe.core.optimizer import SwiftMoEOptimizer
from tests import gpt_models as gm
from tests.distributed import run_distributed

STEPS = 6
MICRO_BATCHES = 2
ROWS = 2
LR = 1e-2
WEIGHT_DECAY = 0.1
CLIP = 0.5
ATOL = 1e-5
LOSS_ATOL = 1e-7
RTOL = 0.0


def _adamw_groups(model: torch.nn.Module) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if not (p.ndim == 1 or n.endswith(".bias"))]
    no_decay = [p for n, p in model.named_parameters() if p.ndim == 1 or n.endswith(".bias")]
    return [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]


def _update_expert_bias_reference(model) -> None:
    """Aux-loss-free balancing on the single-process reference (Megatron's rule, no collectives)."""
    for layer in model.decoder.layers:
        router = layer.mlp.router
        if router.enable_expert_bias:
            tokens = router.local_tokens_per_expert
            router.expert_bias += torch.sign(tokens.mean() - tokens) * router.config.moe_router_bias_update_rate
            tokens.zero_()


def _train_reference(reference, world_size: int) -> list[float]:
    optimizer = torch.optim.AdamW(_adamw_groups(reference), lr=LR)
    micro_batches = world_size * MICRO_BATCHES
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / micro_batches))
    losses = []
    for step in range(STEPS):
        optimizer.zero_grad()
        total = 0.0
        for rank in range(world_size):
            for micro in range(MICRO_BATCHES):
                loss = gm.lm_loss(reference, *gm.batch(step, rank * MICRO_BATCHES + micro, ROWS))
                (loss / micro_batches).backward()
                total += loss.item()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), CLIP)
        optimizer.step()
        _update_expert_bias_reference(reference)
        losses.append(total / micro_batches)
    return losses


def _gather_experts(shards) -> torch.Tensor:
    """Full ``[E, P]`` expert weights from every rank's master shard."""
    parts = [torch.empty_like(shards.master) for _ in range(shards.num_ranks)]
    dist.all_gather(parts, shards.master.detach().contiguous(), group=shards.group)
    return torch.cat(parts, dim=1)[:, : shards.expert_numel]


def exactness_worker(
    rank: int,
    world_size: int,
    topk: int,
    slots: int,
    num_experts: int,
    placement: str,
    router: str = "softmax_aux",
    corrupt: bool = False,
):
    gm.setup()
    torch.set_default_dtype(torch.float64)
    config = gm.tiny_config(
        num_experts=num_experts, topk=topk, params_dtype=torch.float64, **ROUTERS[router]
    )
    reference = gm.build_reference(config)
    gm.skew_router(reference)
    swift = gm.build_swiftmoe(config, SwiftMoEConfig(slots_per_rank=slots, placement=placement))
    gm.copy_reference_into(swift, reference)
    optimizer = SwiftMoEOptimizer(swift, lr=LR, weight_decay=WEIGHT_DECAY, clip_grad=CLIP)
    layers = optimizer.layers

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / MICRO_BATCHES))
    losses, placements, pairs = [], [], []
    for step in range(STEPS):
        placements.append([layer.placement.clone() for layer in layers])
        optimizer.zero_grad()
        total = torch.zeros(())
        for micro in range(MICRO_BATCHES):
            loss = gm.lm_loss(swift, *gm.batch(step, rank * MICRO_BATCHES + micro, ROWS))
            (loss / MICRO_BATCHES).backward()
            total += loss.detach()
            counts = torch.tensor(
                [[layer.token_dispatcher.last_routed_pairs, int(layer.token_dispatcher.last_tokens_per_slot.sum())]
                 for layer in layers]
            )
            dist.all_reduce(counts)
            pairs.append(counts)
        if corrupt and step == 1 and rank == 0:
            layers[0].experts.fc1.grad[0] *= 2  # as if one replica's gradient were counted twice
        optimizer.step()
        dist.all_reduce(total)
        losses.append(total.item() / (world_size * MICRO_BATCHES))

    experts = [_gather_experts(shards) for shards in optimizer.expert_shards]
    slots_ok = all(
        torch.equal(layer.experts.flat_slots(layer.experts.fc1, layer.experts.fc2), full[layer.slot_experts])
        for layer, full in zip(layers, experts)
    )
    result = None
    if rank == 0:
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
        ref_losses = _train_reference(reference, world_size)
        ref_experts = [
            torch.cat([w.reshape(num_experts, -1) for w in gm.reference_expert_weights(reference, i)], dim=1)
            for i in range(len(layers))
        ]
        ref_dense = {k: v for k, v in reference.state_dict().items() if ".experts." not in k and "_extra" not in k}
        swift_state = swift.state_dict()
        result = dict(
            losses=losses,
            ref_losses=ref_losses,
            experts=experts,
            ref_experts=ref_experts,
            dense={k: swift_state[k] for k in ref_dense},
            ref_dense=ref_dense,
            placements=placements,
            pairs=pairs,
            slots_ok=slots_ok,
        )
    dist.barrier()
    return result


ROUTERS = {
    "softmax_aux": {},  # softmax scores, aux loss + z-loss (tiny_config's defaults)
    "sigmoid_bias": dict(  # DeepSeek-V3 style: sigmoid scores, aux-loss-free expert bias
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=1e-2,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
    ),
}

# The second environment (.ci/run) runs world sizes 1-4, both placements and both routers; the
# rest depends on megatron-core's version no more than these.
ONE_VERSION = pytest.mark.one_version
CASES = [
    # world_size, topk, slots_per_rank, num_experts, placement, router
    pytest.param(1, 1, 4, 4, "balanced", "softmax_aux", marks=ONE_VERSION),
    (1, 2, 4, 3, "balanced", "softmax_aux"),
    pytest.param(2, 1, 3, 4, "balanced", "softmax_aux", marks=ONE_VERSION),
    (2, 2, 2, 4, "contiguous", "softmax_aux"),
    pytest.param(3, 1, 2, 4, "balanced", "softmax_aux", marks=ONE_VERSION),
    pytest.param(3, 2, 4, 6, "balanced", "softmax_aux", marks=ONE_VERSION),
    pytest.param(4, 1, 1, 4, "balanced", "softmax_aux", marks=ONE_VERSION),
    (4, 2, 2, 4, "contiguous", "softmax_aux"),
    pytest.param(2, 2, 3, 4, "balanced", "sigmoid_bias", marks=ONE_VERSION),
    (3, 1, 2, 5, "balanced", "sigmoid_bias"),
]


@pytest.mark.parametrize("world_size,topk,slots,num_experts,placement,router", CASES)
def test_matches_single_process_reference(world_size, topk, slots, num_experts, placement, router, tmp_path):
    r = run_distributed(
        exactness_worker, world_size, topk, slots, num_experts, placement, router, tmp_path=tmp_path
    )
    torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(r["ref_losses"]), atol=LOSS_ATOL, rtol=RTOL)
    for got, want in zip(r["experts"], r["ref_experts"]):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    for key, want in r["ref_dense"].items():
        torch.testing.assert_close(r["dense"][key], want, atol=ATOL, rtol=RTOL, msg=key)
    assert r["slots_ok"], "slot weights differ from the owners' master weights"
    # No (token, expert) pair lost or duplicated: processed == routed, every micro-batch, every layer.
    for counts in r["pairs"]:
        assert torch.equal(counts[:, 0], counts[:, 1]), counts
        assert int(counts[:, 0].min()) == topk * world_size * ROWS * gm.SEQ
    # Skewed routing must have moved replicas, or this test proves little.
    if world_size * slots > num_experts:
        first = r["placements"][0][0]
        assert any(not torch.equal(p[0], first) for p in r["placements"][1:]), "placement never changed"


@pytest.mark.one_version
def test_negative_control_double_counted_replica_fails(tmp_path):
    r = run_distributed(exactness_worker, 2, 1, 3, 4, "balanced", "softmax_aux", True, tmp_path=tmp_path)
    worst = max((got - want).abs().max().item() for got, want in zip(r["experts"], r["ref_experts"]))
    assert worst > 100 * ATOL, worst
