"""SwiftMoELayer construction errors, spec conversion, and the slot experts' two GEMM paths."""

from __future__ import annotations

import pytest
import torch

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_swiftmoe.core.config import SwiftMoEConfig
from megatron_swiftmoe.core.experts import SlotExperts
from megatron_swiftmoe.core.layer import SwiftMoELayer, moe_submodules, swiftmoe_spec
from tests import gpt_models as gm
from tests.distributed import run_distributed

BAD_LAYOUTS = [
    # (config overrides, slots_per_rank, words the message must contain); world size 2
    (dict(num_experts=8), 2, ["slots_per_rank", "num_moe_experts (8)"]),
    (dict(num_experts=2, topk=3), 2, ["moe_router_topk (3)", "num_moe_experts (2)"]),
    (dict(moe_expert_capacity_factor=1.0), 2, ["moe_expert_capacity_factor"]),
    (dict(add_bias_linear=True), 2, ["add_bias_linear"]),
    (dict(expert_model_parallel_size=2), 2, ["expert_model_parallel_size"]),
]


def construction_worker(rank: int, world_size: int) -> list:
    gm.setup()
    messages = []
    for overrides, slots, _ in BAD_LAYOUTS:
        overrides = dict(overrides)
        config = gm.tiny_config(num_experts=overrides.pop("num_experts", 4), **overrides)
        submodules = moe_submodules(get_gpt_layer_local_spec(num_experts=config.num_moe_experts))
        try:
            SwiftMoELayer(config, submodules, swiftmoe=SwiftMoEConfig(slots_per_rank=slots))
            messages.append(None)
        except ValueError as error:
            messages.append(str(error))
    return messages


def test_bad_configuration_names_the_setting(tmp_path):
    messages = run_distributed(construction_worker, 2, tmp_path=tmp_path)
    for (overrides, _, words), message in zip(BAD_LAYOUTS, messages):
        assert message is not None, f"no error raised for {overrides}"
        for word in words:
            assert word in message, message


def test_swiftmoe_config_rejects_bad_values():
    with pytest.raises(ValueError, match="slots_per_rank must be an integer >= 1, got 0"):
        SwiftMoEConfig(slots_per_rank=0)
    with pytest.raises(ValueError, match="placement must be one of"):
        SwiftMoEConfig(placement="random")
    with pytest.raises(ValueError, match="grouped_gemm must be one of"):
        SwiftMoEConfig(grouped_gemm="yes")
    with pytest.raises(ValueError, match=r"replica_counts must be one of \('load', 'paper'\), got 'even'"):
        SwiftMoEConfig(replica_counts="even")
    with pytest.raises(ValueError, match=r"split must be one of \('rank', 'replica'\), got 'slot'"):
        SwiftMoEConfig(split="slot")


def test_spec_conversion_keeps_router_and_rejects_dense_specs():
    spec = get_gpt_layer_local_spec(num_experts=4)
    converted = swiftmoe_spec(spec, SwiftMoEConfig(slots_per_rank=3))
    mlp = converted.submodules.mlp
    module, settings = (mlp.module, mlp.params) if isinstance(mlp, ModuleSpec) else (mlp.func, mlp.keywords)
    assert module is SwiftMoELayer
    assert settings["swiftmoe"].slots_per_rank == 3
    assert moe_submodules(converted).router is moe_submodules(spec).router
    assert moe_submodules(spec).experts is not None and spec.submodules.mlp is not mlp, "input spec must not be modified"
    with pytest.raises(ValueError, match="no MoE layer"):
        swiftmoe_spec(get_gpt_layer_local_spec(), SwiftMoEConfig())


@pytest.mark.parametrize("gated", [True, False])
def test_grouped_gemm_matches_loop(gated):
    torch.manual_seed(0)
    config = gm.tiny_config(gated_linear_unit=gated, activation_func=torch.nn.functional.silu if gated
                            else torch.nn.functional.gelu)
    loop, grouped = (SlotExperts(3, config, num_slots=3, grouped_gemm=mode) for mode in ("off", "on"))
    weights = torch.randn(3, loop.expert_numel)
    loop.load_flat(weights)
    grouped.load_flat(weights)
    tokens_per_slot = torch.tensor([5, 0, 7])  # an empty slot included
    x = torch.randn(12, config.hidden_size)
    upstream = torch.randn(12, config.hidden_size)
    outputs = []
    for experts in (loop, grouped):
        xi = x.clone().requires_grad_()
        y, bias = experts(xi, tokens_per_slot)
        assert bias is None
        y.backward(upstream)
        outputs.append((y, xi.grad, experts.fc1.grad, experts.fc2.grad))
    for a, b in zip(*outputs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
