"""Overlapped expert traffic (``core/overlap.py``) at the layer level: it really overlaps, and it
computes the same bits as the synchronous path.

Two gloo ranks, a 3-layer GPT-MoE in bf16 (so the slots accumulate in fp32 ``main_grad``, whose
hook must run before the overlap's), 3 micro-batches per step, skewed routing so that the
placement moves. The same training runs with the overlaps off and on; the overlapped run
records the order of its collectives' starts and waits and of the layers' forward and backward.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from megatron_swiftmoe.core import compat
from megatron_swiftmoe.core.config import SwiftMoEConfig
from megatron_swiftmoe.core.optimizer import ExpertShards, SwiftMoEOptimizer
from megatron_swiftmoe.core.layer import swiftmoe_layers
from tests import gpt_models as gm
from tests.distributed import run_distributed
from tests.test_failures import BOUND_S, INJECT, launch, records, tiny
from tests.test_pipeline import ATOL, FLAGS as PIPELINE_FLAGS, NO_DROPOUT, RTOL, TWO_STAGES, assert_same_training
from tests.test_training import pretrain

STEPS, MICRO_BATCHES, LAYERS = 3, 3, 3


def _instrument(events: list, layers) -> None:
    """Record ``(what, layer index)`` for the shards' starts and waits and the layers' forward
    (when it begins) and backward (when the gradient of the layer's output arrives)."""
    index = {id(layer): i for i, layer in enumerate(layers)}

    def wrap(name: str, method, only_if=None):
        def wrapper(self, *args, **kwargs):
            if only_if is None or only_if(self):
                events.append((name, index[id(self.layer)]))
            return method(self, *args, **kwargs)
        return wrapper

    ExpertShards.start_grad_reduction = wrap("start grads", ExpertShards.start_grad_reduction)
    ExpertShards.finish_grad_reduction = wrap("wait grads", ExpertShards.finish_grad_reduction)
    ExpertShards.start_param_transfer = wrap("start params", ExpertShards.start_param_transfer)
    ExpertShards.finish_param_transfer = wrap("wait params", ExpertShards.finish_param_transfer,
                                              only_if=lambda shards: shards.param_transfer_pending)
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda module, args, i=i: events.append(("forward", i)))

        def on_output(module, args, output, i=i):
            if output[0].requires_grad:
                output[0].register_hook(lambda grad: events.append(("backward", i)))

        layer.register_forward_hook(on_output)


def _train(rank: int, overlap: bool, events: list | None = None) -> dict:
    compat.manual_seed(1234)
    config = gm.tiny_config(num_experts=4, topk=2, num_layers=LAYERS, params_dtype=torch.bfloat16, bf16=True)
    model = Float16Module(config, gm.build_swiftmoe(config, SwiftMoEConfig(slots_per_rank=3)))
    gm.skew_router(model.module)
    optimizer = SwiftMoEOptimizer(model, lr=1e-2, clip_grad=1.0, overlap_grad_reduce=overlap,
                                  overlap_param_gather=overlap)
    layers = swiftmoe_layers(model)
    if events is not None:
        _instrument(events, layers)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / MICRO_BATCHES))
    losses, placements = [], []
    for step in range(STEPS):
        optimizer.zero_grad()
        for micro in range(MICRO_BATCHES):
            if events is not None:
                events.append(("micro-batch", micro))
            context = optimizer.no_sync() if micro < MICRO_BATCHES - 1 else torch.enable_grad()
            with context:
                loss = gm.lm_loss(model, *gm.batch(step, rank * MICRO_BATCHES + micro, 2))
                (loss / MICRO_BATCHES).backward()
            losses.append(loss.item())
        if events is not None:
            events.append(("step", step))
        optimizer.step()
        placements.append([layer.placement.clone() for layer in layers])
    optimizer.finish_param_sync()
    result = dict(
        losses=losses,
        placements=placements,
        masters=[s.master.detach().clone() for s in optimizer.expert_shards],
        slots=[torch.cat([p.detach().reshape(-1) for p in layer.experts.parameters()]) for layer in layers],
    )
    if overlap:  # every micro-batch but the last must run inside no_sync()
        optimizer.zero_grad()
        try:
            for micro in range(2):
                (gm.lm_loss(model, *gm.batch(0, micro, 2)) / 2).backward()
        except RuntimeError as error:
            result["misuse"] = str(error)
        optimizer.zero_grad()
    return result


def overlap_worker(rank: int, world_size: int):
    gm.setup()
    off = _train(rank, overlap=False)
    events: list = []
    on = _train(rank, overlap=True, events=events)
    everything = [None] * world_size
    dist.all_gather_object(everything, (off, on, events))
    return everything


def test_overlapped_traffic_overlaps_and_is_bit_identical(tmp_path):
    ranks = run_distributed(overlap_worker, 2, tmp_path=tmp_path)
    last = LAYERS - 1
    for off, on, events in ranks:
        # The same bits as the synchronous path: losses, placements, shards and slots.
        assert on["losses"] == off["losses"]
        assert all(torch.equal(a, b) for x, y in zip(on["placements"], off["placements"]) for a, b in zip(x, y))
        assert len({tuple(torch.cat([p.flatten() for p in x]).tolist()) for x in off["placements"]}) > 1, \
            "the placement never moved: the test shows little"
        assert all(torch.equal(a, b) for a, b in zip(on["masters"], off["masters"]))
        assert all(torch.equal(a, b) for a, b in zip(on["slots"], off["slots"]))
        assert "no_sync" in on["misuse"], on.get("misuse")

        for step in range(STEPS):
            begin = events.index(("micro-batch", 0), events.index(("step", step - 1)) if step else 0)
            last_micro = events.index(("micro-batch", MICRO_BATCHES - 1), begin)
            step_at = events.index(("step", step))
            # Earlier micro-batches only accumulate: no reduction starts before the last one.
            assert all(name != "start grads" for name, _ in events[begin:last_micro])
            # Each layer's reduction starts in the last micro-batch's backward, before the backward
            # of the layer below it: the last layer's before the first layer's backward has run ...
            last_backward = events[last_micro:step_at]
            for layer in range(1, LAYERS):
                assert last_backward.index(("start grads", layer)) < last_backward.index(("backward", layer - 1)), \
                    last_backward
            assert last_backward.index(("start grads", last)) < last_backward.index(("backward", 0))
            assert ("start grads", 0) in last_backward
            # ... and all are waited for only in the step.
            assert all(events.index(("wait grads", layer), step_at) < events.index(("start params", 0), step_at)
                       for layer in range(LAYERS))
            if step == 0:
                continue
            # The previous step started every layer's re-placement; layer L's is waited for only
            # when its slots are about to compute, after the forward of the layers before it began.
            previous = events.index(("step", step - 1))
            assert max(events.index(("start params", layer), previous) for layer in range(LAYERS)) < begin
            for layer in range(LAYERS):
                wait = events.index(("wait params", layer), previous)
                assert begin < events.index(("forward", layer), begin) < wait < last_micro, events[previous:last_micro]
            first_forward_of_layer_1 = events.index(("forward", 1), begin)
            assert ("wait params", last) not in events[previous:first_forward_of_layer_1]
            assert events.index(("wait params", last), previous) > events.index(("forward", last), begin)


# ---------------------------------------------------------------- the trainer, end to end

@pytest.mark.one_version  # our trainer's schedule, not megatron-core's
def test_trainer_overlaps_train_like_synchronous_and_static_and_resume(tmp_path):
    """PP 2 x DP 2, 4 micro-batches per step, evaluation every 2 iterations, a checkpoint at 3:
    the overlapped run computes the synchronous run's bits, matches the static baseline, and a
    run resumed from its checkpoint continues it exactly."""
    flags = [*PIPELINE_FLAGS, *NO_DROPOUT, *TWO_STAGES, "--train-iters", "6", "--eval-interval", "2",
             "--eval-iters", "1"]
    overlap = ["--overlap-grad-reduce", "--overlap-param-gather"]
    checkpoint = str(tmp_path / "ckpt")
    on = pretrain(tmp_path, "on", 4, *flags, *overlap, "--swiftmoe", "--save", checkpoint, "--save-interval", "3")
    off = pretrain(tmp_path, "off", 4, *flags, "--swiftmoe")
    static = pretrain(tmp_path, "static", 4, *flags, *overlap, "--no-swiftmoe")
    # Resume from the checkpoint saved at iteration 3 (the run also saved its last, at 6).
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("3")
    resumed = pretrain(tmp_path, "resumed", 4, *flags, *overlap, "--swiftmoe", "--load", checkpoint,
                       "--exit-interval", "5")  # stops with a re-placement in flight
    keys = ("lm_loss", "grad_norm", "aux_loss", "valid_lm_loss", "layers")
    assert [r["iteration"] for r in on] == list(range(1, 7))
    assert [r["iteration"] for r in on if "valid_lm_loss" in r] == [2, 4, 6]
    for key in keys:
        assert [r.get(key) for r in on] == [r.get(key) for r in off], key  # bit-identical
        assert [r.get(key) for r in resumed] == [r.get(key) for r in on[3:5]], key
    assert_same_training(on, static)
    torch.testing.assert_close(torch.tensor([r["valid_lm_loss"] for r in on if "valid_lm_loss" in r]),
                               torch.tensor([r["valid_lm_loss"] for r in static if "valid_lm_loss" in r]),
                               rtol=RTOL, atol=ATOL)
    assert len({tuple(r["layers"][0]["replicas_per_expert"]) for r in on}) > 1, "replicas never moved"


@pytest.mark.one_version  # our trainer's schedule, not megatron-core's
def test_exception_on_one_rank_with_transfers_in_flight_ends_every_rank(tmp_path):
    """Rank 1 fails as iteration 3 starts, with the re-placement of step 2 in flight and no launcher
    to stop the others: rank 0 still ends by itself, promptly, with its message."""
    results, elapsed = launch(tmp_path, 2, *INJECT, "1", "2", "raise", "--", *tiny(2), "--train-iters", "6",
                              "--overlap-grad-reduce", "--overlap-param-gather", "--distributed-timeout-minutes",
                              "0.5", "--metrics-path", str(tmp_path / "metrics.jsonl"))
    assert all(r.returncode != 0 for r in results) and elapsed < BOUND_S, [r.out[-2000:] for r in results]
    assert "RuntimeError: injected fault on rank 1" in results[1].out
    assert "a collective operation failed" in results[0].out, results[0].out[-2000:]
    assert len(records(tmp_path / "metrics.jsonl")) == 2
