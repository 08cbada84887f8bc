"""Tiny Megatron-Core GPT-MoE models for the tests, and the single-process reference."""

from __future__ import annotations

import torch

from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig

from megatron_swiftmoe.core import compat
from megatron_swiftmoe.core.config import SwiftMoEConfig
from megatron_swiftmoe.core.layer import SwiftMoELayer, swiftmoe_spec

VOCAB = 64
SEQ = 8


def tiny_config(num_experts: int = 4, topk: int = 1, **overrides) -> TransformerConfig:
    settings = dict(
        num_layers=2,
        hidden_size=16,
        ffn_hidden_size=24,
        num_attention_heads=2,
        num_moe_experts=num_experts,
        moe_router_topk=topk,
        moe_router_pre_softmax=topk == 1,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=1e-2,
        moe_z_loss_coeff=1e-3,
        moe_token_dispatcher_type="allgather",
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
    )
    settings.update(overrides)
    return TransformerConfig(**settings)


def build_reference(config: TransformerConfig) -> GPTModel:
    """All experts in this process: Megatron's stock MoELayer with SequentialMLP experts."""
    spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts, moe_grouped_gemm=False)
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=SEQ)


def build_swiftmoe(config: TransformerConfig, swiftmoe: SwiftMoEConfig) -> GPTModel:
    spec = swiftmoe_spec(get_gpt_layer_local_spec(num_experts=config.num_moe_experts), swiftmoe)
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=SEQ)


def skew_router(model: GPTModel, strength: float = 3.0) -> None:
    """Make the last expert popular, so that replica counts and placements really move.

    (The initial, uniform placement gives spare slots to the lowest expert ids.)
    """
    with torch.no_grad():
        for layer in model.decoder.layers:
            weight = layer.mlp.router.weight
            weight[-1] += strength * weight.abs().mean() * torch.sign(weight.mean(0))


def reference_expert_weights(reference: GPTModel, layer_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[E, F1, H]``, ``[E, H, F]`` stacked from a stock layer's SequentialMLP experts."""
    experts = reference.decoder.layers[layer_index].mlp.experts.local_experts
    fc1 = torch.stack([e.linear_fc1.weight.detach() for e in experts])
    fc2 = torch.stack([e.linear_fc2.weight.detach() for e in experts])
    return fc1, fc2


def copy_reference_into(swift: GPTModel, reference: GPTModel) -> None:
    """Same dense weights and same experts in the SwiftMoE model as in the reference."""
    dense = {k: v for k, v in reference.state_dict().items() if ".experts." not in k}
    missing, unexpected = swift.load_state_dict(dense, strict=False)
    assert not unexpected, unexpected
    assert all(".experts." in k or k.endswith(("placement", "step_popularity")) or "_extra_state" in k for k in missing), missing
    for index, layer in enumerate(swift.decoder.layers):
        assert isinstance(layer.mlp, SwiftMoELayer)
        layer.mlp.load_expert_weights(*reference_expert_weights(reference, index))


def batch(step: int, micro_batch: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic skewed token ids ``[rows, SEQ]`` and position ids for one micro-batch."""
    generator = torch.Generator().manual_seed(1000 * step + micro_batch)
    zipf = 1.0 / torch.arange(1, VOCAB + 1, dtype=torch.float64) ** 1.2
    tokens = torch.multinomial(zipf, rows * (SEQ + 1), replacement=True, generator=generator)
    tokens = tokens.view(rows, SEQ + 1)
    positions = torch.arange(SEQ).unsqueeze(0).expand(rows, -1)
    return tokens, positions


def lm_loss(model: GPTModel, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy, in the model's dtype (Megatron's own loss casts to fp32)."""
    logits = model(tokens[:, :-1], positions, None)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def setup(seed: int = 1234) -> None:
    from megatron.core import parallel_state

    compat.apply()
    parallel_state.initialize_model_parallel()
    compat.manual_seed(seed)
