"""Model shape for the cost model, read from a training config YAML (no Megatron import).

Parameter counts follow what this program builds (``megatron_swiftmoe.training.model``): bias-free
linear layers, tied embeddings unless ``untie-embeddings-and-output-weights``, learned
absolute positions unless ``position-embedding-type: rope``, LayerNorm (weight + bias) or
RMSNorm (weight), every ``moe-layer-freq``-th layer an MoE layer (router ``[E, h]`` plus E
experts), the others a dense MLP. With the tiny_cpu config this gives 566,912 dense
parameters, the size of the dense gradient buffer our optimizer reduce-scatters.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ModelShape", "load_model", "MODEL_NAMES", "CONFIG_DIR"]

#: ``configs/`` of the source checkout.
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
MODEL_NAMES = {
    "gpt-small": "gpt_small_moe.yaml",
    "gpt-medium": "gpt_medium_moe.yaml",
    "gpt-large": "gpt_large_moe.yaml",
}
DEFAULT_VOCAB_SIZE = 8192  # megatron_swiftmoe.training.arguments.DEFAULT_VOCAB_SIZE (built-in tokenizer)


@dataclass(frozen=True)
class ModelShape:
    """The sizes the cost model needs. ``moe_layers``: 0/1 per layer (1 = MoE)."""

    name: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    moe_ffn_hidden_size: int
    num_experts: int
    topk: int
    seq_length: int
    global_batch_size: int
    micro_batch_size: int
    slots_per_rank: int
    vocab_size: int  # padded
    moe_layers: tuple[int, ...]
    param_bytes: int = 2  # 2: bf16/fp16, 4: fp32
    swiglu: bool = False
    tied_embeddings: bool = True
    position_embeddings: int = 0  # rows of the learned position table (0 with rope)
    norm_params: int = 2  # per hidden unit: 2 LayerNorm (weight + bias), 1 RMSNorm
    placement_policy: str = "balanced"  # SwiftMoE's --swiftmoe-placement: balanced | contiguous

    def __post_init__(self) -> None:
        if len(self.moe_layers) != self.num_layers:
            raise ValueError(f"moe_layers has {len(self.moe_layers)} entries for {self.num_layers} layers")
        if self.num_moe_layers == 0:
            raise ValueError(f"model {self.name} has no MoE layer")
        if not 1 <= self.topk <= self.num_experts:
            raise ValueError(f"topk ({self.topk}) must be in [1, num_experts={self.num_experts}]")

    def replace(self, **changes: Any) -> "ModelShape":
        return dataclasses.replace(self, **changes)

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)

    @property
    def expert_params(self) -> int:
        """One expert: fc1 ``[F1, h]`` (F1 = 2F with SwiGLU) and fc2 ``[h, F]``."""
        fc1 = 2 * self.moe_ffn_hidden_size if self.swiglu else self.moe_ffn_hidden_size
        return (fc1 + self.moe_ffn_hidden_size) * self.hidden_size

    @property
    def dense_mlp_params(self) -> int:
        fc1 = 2 * self.ffn_hidden_size if self.swiglu else self.ffn_hidden_size
        return (fc1 + self.ffn_hidden_size) * self.hidden_size

    @property
    def dense_matmul_params(self) -> int:
        """Parameters every token multiplies with (excluding experts): attention, dense MLPs,
        routers and the output layer (tied or not, the logits are a ``V x h`` matmul)."""
        h = self.hidden_size
        attention = 4 * h * h * self.num_layers
        mlps = self.dense_mlp_params * (self.num_layers - self.num_moe_layers)
        routers = self.num_experts * h * self.num_moe_layers
        return attention + mlps + routers + self.vocab_size * h

    @property
    def dense_params(self) -> int:
        """Every non-expert parameter: what ZeRO-1 reduce-scatters and all-gathers."""
        h = self.hidden_size
        norms = self.norm_params * h * (2 * self.num_layers + 1)  # 2 per layer + the final one
        input_embeddings = 0 if self.tied_embeddings else self.vocab_size * h  # tied: the output layer's
        return self.dense_matmul_params + input_embeddings + self.position_embeddings * h + norms

    @property
    def dense_flops_per_token(self) -> float:
        """Forward + backward FLOPs per token outside the experts (Narayanan et al. 2021)."""
        return 6.0 * self.dense_matmul_params + 12.0 * self.num_layers * self.seq_length * self.hidden_size

    @property
    def tokens(self) -> int:
        """Tokens per iteration (global batch x sequence length)."""
        return self.global_batch_size * self.seq_length

    def summary(self) -> str:
        dtype = {2: "bf16", 4: "fp32"}.get(self.param_bytes, f"{self.param_bytes}-byte")
        return (
            f"{self.name}: {self.num_layers} layers ({self.num_moe_layers} MoE), hidden {self.hidden_size}, "
            f"{self.num_experts} experts top-{self.topk} of {self.expert_params / 1e6:.2f}M params, "
            f"{self.dense_params / 1e6:.1f}M dense params, batch {self.global_batch_size} x "
            f"{self.seq_length} tokens (micro-batch {self.micro_batch_size}), "
            f"{self.slots_per_rank} slots/rank, {dtype}"
        )


def _moe_layer_pattern(value: Any, num_layers: int) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return tuple(int(i % value == 0) for i in range(num_layers))
    if isinstance(value, str):
        # Same restricted grammar as --moe-layer-freq: int/list literals, +, *, parentheses.
        from megatron_swiftmoe.training.arguments import moe_layer_freq_type

        value = moe_layer_freq_type(value)
        if isinstance(value, int):
            return _moe_layer_pattern(value, num_layers)
    if isinstance(value, list) and len(value) == num_layers and set(value) <= {0, 1}:
        return tuple(int(v) for v in value)
    raise ValueError(f"moe-layer-freq {value!r}: need an int >= 1 or a 0/1 list of length num-layers ({num_layers})")


def load_model(spec: str | Path, **overrides: Any) -> ModelShape:
    """A :class:`ModelShape` from a model name (``gpt-small|gpt-medium|gpt-large``) or a
    training config YAML (keys are flag names, dashes or underscores). ``overrides`` are
    ModelShape fields (``num_experts=8``, ``global_batch_size=1024``...); ``None`` keeps the
    config's value. Defaults as Megatron-LM / this program: ffn 4h (SwiGLU: int(8h/3/64)*64),
    moe-ffn = ffn, every layer MoE, vocabulary 8192 padded to a multiple of 128, micro-batch 1,
    global batch = micro-batch, 1 slot per rank, fp32 unless bf16/fp16.
    """
    import yaml

    path = Path(MODEL_NAMES.get(str(spec), spec))
    if not path.is_absolute() and not path.exists() and (CONFIG_DIR / path).exists():
        path = CONFIG_DIR / path
    if not path.is_file():
        raise ValueError(f"model {spec!r}: not a model name ({', '.join(MODEL_NAMES)}) nor a config file")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a config must be a YAML mapping of flag names to values")
    cfg = {str(k).replace("-", "_"): v for k, v in raw.items() if v is not None}

    def need(key: str) -> Any:
        if key not in cfg:
            raise ValueError(f"{path}: {key.replace('_', '-')} is required by the cost model")
        return cfg[key]

    num_layers, hidden = int(need("num_layers")), int(need("hidden_size"))
    swiglu = bool(cfg.get("swiglu", False))
    ffn = int(cfg.get("ffn_hidden_size") or (int(4 * hidden * 2 / 3 / 64) * 64 if swiglu else 4 * hidden))
    divisor = int(cfg.get("make_vocab_size_divisible_by", 128))
    vocab = int(cfg.get("vocab_size", DEFAULT_VOCAB_SIZE))
    vocab = -(-vocab // divisor) * divisor
    micro = int(cfg.get("micro_batch_size", 1))
    seq = int(need("seq_length"))
    learned = cfg.get("position_embedding_type", "learned_absolute") == "learned_absolute"
    fields = dict(
        name=path.stem,
        num_layers=num_layers,
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        moe_ffn_hidden_size=int(cfg.get("moe_ffn_hidden_size", ffn)),
        num_experts=int(need("num_experts")),
        topk=int(cfg.get("moe_router_topk", 2)),
        seq_length=seq,
        global_batch_size=int(cfg.get("global_batch_size", micro)),
        micro_batch_size=micro,
        slots_per_rank=int(cfg.get("swiftmoe_slots_per_rank", 1)),
        vocab_size=vocab,
        moe_layers=_moe_layer_pattern(cfg.get("moe_layer_freq", 1), num_layers),
        param_bytes=2 if cfg.get("bf16") or cfg.get("fp16") else 4,
        swiglu=swiglu,
        tied_embeddings=not cfg.get("untie_embeddings_and_output_weights", False),
        position_embeddings=int(cfg.get("max_position_embeddings", seq)) if learned else 0,
        norm_params=1 if cfg.get("normalization") == "RMSNorm" else 2,
        placement_policy=str(cfg.get("swiftmoe_placement", "balanced")),
    )
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"unknown model overrides {unknown}")
    fields.update({k: v for k, v in overrides.items() if v is not None})
    if "moe_layers" not in overrides and fields["num_layers"] != num_layers:
        fields["moe_layers"] = _moe_layer_pattern(cfg.get("moe_layer_freq", 1), fields["num_layers"])
    return ModelShape(**fields)
