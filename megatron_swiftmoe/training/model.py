"""GPT-MoE model construction for the training program: spec, deterministic init, precision.

The same flags build the same initial network whether experts are replicated (SwiftMoE) or
partitioned (Megatron's static expert parallelism), and on any number of ranks: every
tensor is drawn from its own seed, keyed by its name (expert tensors by their global expert
index, layers by their global layer number, the last pipeline stage's copy of a tied output
weight as the word embedding), with Megatron's init distributions. So a ``--swiftmoe`` run and
the baseline, on any number of ranks and pipeline stages, start from identical weights, and
their losses can be compared step by step. (Building the two draws differently from the
random generators; the trainer seeds them again after the build, so that the dropout masks
are the same too.)
"""

from __future__ import annotations

import argparse
import re
import zlib

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_swiftmoe.core.config import swiftmoe_config_from_args
from megatron_swiftmoe.core.layer import SwiftMoELayer, moe_submodules, swiftmoe_spec
from megatron_swiftmoe.core.optimizer import param_grad
from megatron_swiftmoe.training.arguments import gpt_model_kwargs

_LOCAL_EXPERT = re.compile(r"^(.*\.experts)\.local_experts\.(\d+)\.(linear_fc[12]\.weight)$")
_DECODER_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_OUTPUT_PROJECTIONS = ("linear_proj.weight", "linear_fc2.weight")


def build_model(args: argparse.Namespace, config: TransformerConfig, vocab_size: int) -> torch.nn.Module:
    """This pipeline stage's GPTModel with SwiftMoE layers (``--swiftmoe``) or Megatron's stock MoE layers.

    The stage builds its share of the layers (Megatron's spec and block pick them by the
    pipeline rank); the first stage has the embedding, the last the output layer and loss.
    Wrapped in Megatron's ``Float16Module`` for ``--bf16`` / ``--fp16``. Local (non-TE) layer
    specs: they run everywhere; Transformer Engine is an optional GPU extra.
    """
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization=args.normalization)
    swiftmoe = swiftmoe_config_from_args(args)
    if swiftmoe is not None and any(_is_moe(layer_spec) for layer_spec in spec.layer_specs):
        spec = swiftmoe_spec(spec, swiftmoe)  # (a pipeline stage may have dense layers only)
    model = GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=vocab_size,
        pre_process=parallel_state.is_pipeline_first_stage(), post_process=parallel_state.is_pipeline_last_stage(),
        **gpt_model_kwargs(args),
    )
    initialize_weights(model, config, args.seed)
    if config.bf16 or config.fp16:
        model = Float16Module(config, model)
    return model


def _is_moe(layer_spec) -> bool:
    """Whether a layer spec's MLP is an MoE layer."""
    try:
        moe_submodules(layer_spec)
    except ValueError:
        return False
    return True


def _init_tensor(key: str, shape: torch.Size, config: TransformerConfig, seed: int) -> torch.Tensor:
    """Megatron's initialisation of the tensor named ``key``, from a seed derived from the name."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
        tensor = torch.empty(shape, dtype=torch.float32)
        if tensor.dim() == 1:
            # Norm weights start at one; biases (and norm biases) at zero.
            tensor.fill_(1.0 if key.endswith(".weight") else 0.0)
        elif key.endswith(_OUTPUT_PROJECTIONS):
            config.output_layer_init_method(tensor)
        else:
            config.init_method(tensor)
    return tensor


def _global_name(model: GPTModel, name: str) -> str:
    """``name`` as in the whole, unsplit model: a stage's ``decoder.layers.i`` by its global
    layer number; the last stage's copy of a tied output weight as the word embedding it copies."""
    if match := _DECODER_LAYER.match(name):
        return f"decoder.layers.{model.decoder.layers[int(match[1])].layer_number - 1}.{match[2]}"
    if name == "output_layer.weight" and model.share_embeddings_and_output_weights:
        return "embedding.word_embeddings.weight"
    return name


@torch.no_grad()
def initialize_weights(model: GPTModel, config: TransformerConfig, seed: int) -> None:
    """Initialise every parameter from its name-keyed seed (see module docstring)."""
    expert_offset = 0
    if config.expert_model_parallel_size > 1:
        local_experts = config.num_moe_experts // config.expert_model_parallel_size
        expert_offset = parallel_state.get_expert_model_parallel_rank() * local_experts
    for name, param in model.named_parameters():
        if getattr(param, "is_swiftmoe_slot", False):
            continue
        key = _global_name(model, name)
        if match := _LOCAL_EXPERT.match(key):
            key = f"{match[1]}.{expert_offset + int(match[2])}.{match[3]}"
        param.copy_(_init_tensor(key, param.shape, config, seed))
    for name, module in model.named_modules():
        if isinstance(module, SwiftMoELayer):
            shapes = module.experts.fc1.shape[1:], module.experts.fc2.shape[1:]
            prefix = _global_name(model, name)
            fc1, fc2 = (
                torch.stack(
                    [
                        _init_tensor(f"{prefix}.experts.{e}.linear_fc{i + 1}.weight", shapes[i], config, seed)
                        for e in range(config.num_moe_experts)
                    ]
                )
                for i in range(2)
            )
            module.load_expert_weights(fc1, fc2)


def allreduce_tied_embedding_grads(model: torch.nn.Module) -> None:
    """With pipeline stages and tied embeddings: sum the gradients of the word embedding (first
    stage) and of its copy, the output weight (last stage), over Megatron's embedding group,
    as Megatron's ``finalize_model_grads`` does, so that both copies take the same update.
    (The copy is marked ``shared``: the gradient norm counts it once, on the first stage.)"""
    gpt = unwrap(model)
    if (
        parallel_state.get_pipeline_model_parallel_world_size() == 1
        or not gpt.share_embeddings_and_output_weights
        or not parallel_state.is_rank_in_embedding_group()
    ):
        return
    dist.all_reduce(param_grad(gpt.shared_embedding_or_output_weight()), group=parallel_state.get_embedding_group())


def unwrap(model: torch.nn.Module) -> GPTModel:
    """The GPTModel inside a ``Float16Module``."""
    return model.module if isinstance(model, Float16Module) else model


def moe_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The MoE layers (SwiftMoE or stock) in order."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return [m for m in model.modules() if isinstance(m, MoELayer)]
