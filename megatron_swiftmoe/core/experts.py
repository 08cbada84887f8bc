"""Expert slots: S replicas of experts on one rank, computed as one grouped GEMM or a loop.

A slot holds the weights of whichever expert the current placement puts there; the
weights are written by the optimizer (never trained in place), so slots carry no identity
of their own and are not checkpointed: they are a cache of the layer's expert shards
(``SwiftMoELayer.expert_shard``), rebuilt after every load. Weight layout per slot follows Megatron's ``MLP`` (``[out, in]``), so an
expert's parameters map one-to-one onto a ``SequentialMLP`` expert's ``linear_fc1`` /
``linear_fc2`` weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SlotExperts(MegatronModule):
    """``num_slots`` expert MLPs (fc1 -> activation -> fc2, no bias) over slot-sorted tokens.

    Built the way Megatron builds its experts modules, ``SlotExperts(num_local_experts, config,
    pg_collection=..., num_slots=S)``: the first argument (how many experts a static layout
    would hold here) is not used; the slots hold replicas of whichever experts the placement
    puts there.

    Parameters:
        fc1: ``[S, F1, H]`` with F1 = 2F for gated linear units (GLU), else F.
        fc2: ``[S, H, F]``.
    Both are flagged ``is_swiftmoe_slot`` so that optimizers keep them out of the dense path.
    """

    def __init__(
        self,
        num_local_experts: int,
        config: TransformerConfig,
        pg_collection=None,
        *,
        num_slots: int,
        grouped_gemm: str = "auto",
        device: torch.device | str | None = None,
        name: str | None = None,
    ):
        super().__init__(config=config)
        hidden = config.hidden_size
        ffn = config.moe_ffn_hidden_size
        fc1_out = 2 * ffn if config.gated_linear_unit else ffn
        self.num_slots = num_slots
        self.grouped_gemm = grouped_gemm
        kwargs = dict(dtype=config.params_dtype, device=device)
        self.fc1 = torch.nn.Parameter(torch.zeros(num_slots, fc1_out, hidden, **kwargs))
        self.fc2 = torch.nn.Parameter(torch.zeros(num_slots, hidden, ffn, **kwargs))
        for param in (self.fc1, self.fc2):
            param.is_swiftmoe_slot = True
        self._recompute_activation_if_asked()

    def _recompute_activation_if_asked(self) -> None:
        """``--recompute-modules moe_act``: as Megatron's grouped experts do, the activation's
        output is not kept for backward but recomputed from fc1's output
        (``CheckpointWithoutOutput``): its storage is freed once the forward pass has used it
        and refilled when the gradient reaches the experts' output."""
        config = self.config
        if config.recompute_granularity != "selective" or "moe_act" not in (config.recompute_modules or ()):
            return
        from megatron.core.tensor_parallel import CheckpointWithoutOutput

        plain, pending = self._activation, []

        def activation(x: torch.Tensor) -> torch.Tensor:
            checkpoint = CheckpointWithoutOutput()
            pending.append(checkpoint)
            return checkpoint.checkpoint(plain, x)

        def discard_after_forward(module, inputs, outputs) -> None:
            while pending:
                pending.pop().discard_output_and_register_recompute(outputs[0])

        self._activation = activation
        self.register_forward_hook(discard_after_forward)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        """Slots are a cache of the expert shards: nothing of theirs goes into a checkpoint."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for name in ("fc1", "fc2"):  # written by checkpoints of earlier versions
            state_dict.pop(prefix + name, None)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        return {}

    @property
    def expert_numel(self) -> int:
        """Number of parameters of one expert (one slot)."""
        return self.fc1[0].numel() + self.fc2[0].numel()

    def flat_slots(self, fc1: torch.Tensor, fc2: torch.Tensor) -> torch.Tensor:
        """``[S, F1, H]``, ``[S, H, F]`` -> ``[S, P]``: one flat vector per slot."""
        return torch.cat([fc1.reshape(fc1.shape[0], -1), fc2.reshape(fc2.shape[0], -1)], dim=1)

    @torch.no_grad()
    def load_flat(self, weights: torch.Tensor) -> None:
        """Write ``weights [S, P]`` (one flat expert per slot) into the slot parameters."""
        split = self.fc1[0].numel()
        self.fc1.copy_(weights[:, :split].view_as(self.fc1))
        self.fc2.copy_(weights[:, split:].view_as(self.fc2))

    def _activation(self, x: torch.Tensor) -> torch.Tensor:
        # Same math as megatron.core.transformer.mlp.MLP's unfused path.
        config = self.config
        if not config.gated_linear_unit:
            return config.activation_func(x)
        x_glu, x_linear = torch.chunk(x, 2, dim=-1)
        if (clamp := config.activation_func_clamp_value) is not None:
            x_glu = x_glu.clamp(min=None, max=clamp)
            x_linear = x_linear.clamp(min=-clamp, max=clamp)
        return config.activation_func(x_glu) * (x_linear + config.glu_linear_offset)

    def _use_grouped_gemm(self, x: torch.Tensor) -> bool:
        if self.grouped_gemm == "auto":
            return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
        return self.grouped_gemm == "on"

    def forward(
        self,
        tokens: torch.Tensor,
        tokens_per_slot: torch.Tensor,
        permuted_probs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        """Run every slot's MLP on its tokens.

        Args:
            tokens: ``[T, H]``, sorted by slot.
            tokens_per_slot: ``[S]`` int, sums to T.
            permuted_probs: unused: the dispatcher applies router probabilities on combine.
        Returns:
            ``([T, H], None)`` (no bias), the interface of Megatron's experts modules.
        """
        if self._use_grouped_gemm(tokens):
            # tokens_per_slot lives on the host (the dispatcher plans there): no sync to read it.
            offsets = torch.cumsum(tokens_per_slot, 0).to(torch.int32).to(tokens.device, non_blocking=True)
            hidden = torch._grouped_mm(tokens, self.fc1.transpose(1, 2), offs=offsets)
            return torch._grouped_mm(self._activation(hidden), self.fc2.transpose(1, 2), offs=offsets), None
        outputs = []
        # unbind: one backward node for all slots instead of S full-size indexing gradients.
        chunks = torch.split(tokens, tokens_per_slot.tolist())
        for chunk, fc1, fc2 in zip(chunks, self.fc1.unbind(0), self.fc2.unbind(0)):
            outputs.append(F.linear(self._activation(F.linear(chunk, fc1)), fc2))
        return torch.cat(outputs) if outputs else tokens[:0], None
