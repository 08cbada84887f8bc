"""SwiftMoEOptimizer invariants: static optimizer state, placement-independent traffic,
whole-step popularity, fp16 loss scaling, bf16 master weights."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

import megatron_swiftmoe.core.optimizer as optimizer_module
from megatron_swiftmoe.core.config import SwiftMoEConfig
from megatron_swiftmoe.core.layer import plan_placement
from megatron_swiftmoe.core.optimizer import DynamicLossScaler, SwiftMoEOptimizer
from tests import gpt_models as gm
from tests.distributed import run_distributed

MICRO_BATCHES = 2


def _train(model, optimizer, rank: int, steps: int, on_step=None) -> list:
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / MICRO_BATCHES))
    history = []
    for step in range(steps):
        optimizer.zero_grad()
        for micro in range(MICRO_BATCHES):
            loss = gm.lm_loss(model, *gm.batch(step, rank * MICRO_BATCHES + micro, 2))
            optimizer.scale_loss(loss / MICRO_BATCHES).backward()
        if on_step:
            on_step(step)
        history.append(optimizer.step())
    return history


def traffic_worker(rank: int, world_size: int, fixed_placement: bool):
    gm.setup()
    config = gm.tiny_config(num_experts=4, topk=1)
    model = gm.build_swiftmoe(config, SwiftMoEConfig(slots_per_rank=2))
    gm.skew_router(model)
    optimizer = SwiftMoEOptimizer(model, lr=1e-2)
    if fixed_placement:
        optimizer_module.plan_placement = lambda popularity, num_ranks, swiftmoe: layer.placement.clone()
    layer = optimizer.layers[0]
    state_ids, placements, popularity_seen = [], [], []

    def record(step: int) -> None:
        placements.append(layer.placement.clone())
        popularity_seen.append(layer.step_popularity.clone())
        if step > 0:  # AdamW creates its moments lazily in the first step
            state_ids.append(
                [
                    (id(m), m.data_ptr(), id(optimizer.adamw.state[m]["exp_avg"]),
                     optimizer.adamw.state[m]["exp_avg"].data_ptr(), optimizer.adamw.state[m]["exp_avg_sq"].data_ptr())
                    for m in optimizer._masters()
                ]
            )

    history = _train(model, optimizer, rank, steps=5, on_step=record)
    next_placement = plan_placement(popularity_seen[-1], world_size, layer.swiftmoe)
    sent = torch.tensor([[h.bytes_sent[k] for k in ("expert_grad", "expert_param", "dense_grad", "dense_param")]
                         for h in history])
    all_sent = [torch.zeros_like(sent) for _ in range(world_size)]
    dist.all_gather(all_sent, sent)
    return dict(
        sent=torch.stack(all_sent),
        state_ids=state_ids,
        placements=placements,
        final_placement=layer.placement.clone(),
        planned_from_last_step=next_placement,
        popularity=popularity_seen,
        expert_numel=layer.experts.expert_numel,
    )


@pytest.mark.parametrize("world_size", [2, pytest.param(3, marks=pytest.mark.one_version)])
def test_state_never_moves_and_traffic_is_placement_independent(world_size, tmp_path):
    dynamic = run_distributed(traffic_worker, world_size, False, tmp_path=tmp_path)
    fixed = run_distributed(traffic_worker, world_size, True, tmp_path=tmp_path)

    assert len({tuple(p.flatten().tolist()) for p in dynamic["placements"]}) > 1, "placement never changed"
    assert len({tuple(p.flatten().tolist()) for p in fixed["placements"]}) == 1
    # Same tensors, same storage, every step: optimizer state never moves.
    assert all(ids == dynamic["state_ids"][0] for ids in dynamic["state_ids"])
    # Bytes per step and rank are the same whatever the placement ...
    assert torch.equal(dynamic["sent"], fixed["sent"])
    # ... and match the cost model: S slots' worth of gradients and parameters per rank.
    slots, padded = 2, -(-dynamic["expert_numel"] // world_size) * world_size
    layers = 2
    assert torch.all(dynamic["sent"][..., 0] == layers * slots * padded * 4)  # fp32 gradients
    assert torch.all(dynamic["sent"][..., 1] == layers * slots * padded * 4)  # fp32 params
    # The next placement is planned from the whole step's popularity (both micro-batches).
    assert torch.equal(dynamic["final_placement"], dynamic["planned_from_last_step"])
    routed_per_step = world_size * MICRO_BATCHES * 2 * gm.SEQ  # top-1
    assert all(int(p.sum()) == routed_per_step for p in dynamic["popularity"])


def precision_worker(rank: int, world_size: int, dtype_name: str):
    gm.setup()
    dtype = getattr(torch, dtype_name)
    config = gm.tiny_config(num_experts=4, topk=2, params_dtype=dtype, bf16=dtype == torch.bfloat16,
                            fp16=dtype == torch.float16)
    model = Float16Module(config, gm.build_swiftmoe(config, SwiftMoEConfig(slots_per_rank=2)))
    scaler = DynamicLossScaler(initial_scale=2.0**40) if dtype == torch.float16 else None
    optimizer = SwiftMoEOptimizer(model, lr=1e-2, loss_scaler=scaler)
    history = _train(model, optimizer, rank, steps=4)
    masters = [m.dtype for m in optimizer._masters()]
    params = {p.dtype for p in model.parameters()}
    return dict(
        skipped=[h.skipped for h in history],
        scale=scaler.scale if scaler else None,
        masters=masters,
        params=params,
        finite=all(bool(torch.isfinite(p).all()) for p in model.parameters()),
    )


def test_bf16_params_with_fp32_master(tmp_path):
    r = run_distributed(precision_worker, 2, "bfloat16", tmp_path=tmp_path)
    assert set(r["masters"]) == {torch.float32}
    assert torch.bfloat16 in r["params"]
    assert r["finite"] and not any(r["skipped"])


def test_fp16_loss_scaling_skips_overflow_and_backs_off(tmp_path):
    # 2**40 overflows fp16 gradients: the first steps must be skipped, the scale halved each time.
    r = run_distributed(precision_worker, 2, "float16", tmp_path=tmp_path)
    assert r["skipped"][0]
    assert r["scale"] == 2.0**40 / 2 ** sum(r["skipped"])
    assert r["finite"]


def test_dynamic_loss_scaler_grows_after_clean_steps():
    scaler = DynamicLossScaler(initial_scale=8.0, growth_interval=2, min_scale=2.0)
    scaler.update(found_inf=False)
    assert scaler.scale == 8.0
    scaler.update(found_inf=False)
    assert scaler.scale == 16.0
    for _ in range(5):
        scaler.update(found_inf=True)
    assert scaler.scale == 2.0


def flexmoe_worker(rank: int, world_size: int, replan_interval: int):
    gm.setup()
    config = gm.tiny_config(num_experts=4, topk=1)
    model = gm.build_swiftmoe(config, SwiftMoEConfig(slots_per_rank=3, replan_interval=replan_interval))
    gm.skew_router(model)
    optimizer = SwiftMoEOptimizer(model, lr=1e-2)
    layers = optimizer.layers
    placements = []
    history = _train(model, optimizer, rank, steps=6,
                     on_step=lambda step: placements.append([layer.placement.clone() for layer in layers]))
    placements.append([layer.placement.clone() for layer in layers])
    sent = torch.tensor([[h.bytes_sent["expert_migration"], h.migration_peak_bytes] for h in history])
    dist.all_reduce(sent)
    return dict(placements=placements, sent=sent, expert_numel=layers[0].experts.expert_numel)


@pytest.mark.one_version
def test_flexmoe_like_replans_every_k_steps_and_migrates_moved_experts_state(tmp_path):
    world_size, k = 2, 2
    r = run_distributed(flexmoe_worker, world_size, k, tmp_path=tmp_path)
    padded = -(-r["expert_numel"] // world_size) * world_size
    bytes_per_expert = padded * (3 * 4 + 4)  # fp32 master + two Adam moments, fp32 params
    moved_any = False
    for step, (before, after) in enumerate(zip(r["placements"], r["placements"][1:]), start=1):
        arrivals = sum(
            len(set(new_row.tolist()) - set(old_row.tolist()))
            for old, new in zip(before, after)
            for old_row, new_row in zip(old, new)
        )
        if step % k:
            assert all(torch.equal(a, b) for a, b in zip(before, after)), f"re-planned at step {step}"
            assert r["sent"][step - 1, 0] == 0
        else:
            assert r["sent"][step - 1, 0] == arrivals * bytes_per_expert
            moved_any |= arrivals > 0
            assert (r["sent"][step - 1, 1] > 0) == (arrivals > 0)
    assert moved_any, "no expert ever moved: the test shows nothing"


@pytest.mark.one_version
def test_swiftmoe_never_migrates(tmp_path):
    r = run_distributed(flexmoe_worker, 2, 1, tmp_path=tmp_path)
    assert torch.all(r["sent"] == 0)
    assert len({tuple(p[0].flatten().tolist()) for p in r["placements"]}) > 1
