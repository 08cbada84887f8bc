"""Model shapes for the cost model: built-in public MoE shapes, or a training config YAML.

A config YAML is read without importing Megatron. Parameter counts follow what this program
builds (``megatron_swiftmoe.training.model``): bias-free linear layers, tied embeddings unless
``untie-embeddings-and-output-weights``, learned absolute positions unless
``position-embedding-type: rope``, LayerNorm (weight + bias) or RMSNorm (weight), every
``moe-layer-freq``-th layer an MoE layer (router ``[E, h]`` plus E experts), the others a dense
MLP. With the tiny_cpu config this gives 566,912 dense parameters, the size of the dense
gradient buffer our optimizer reduce-scatters.

Built-in shapes (:data:`BUILTIN_MODELS`), from the public Hugging Face ``config.json`` of each
model (field names as written there); all use SwiGLU experts (3 matrices of ``h x F``),
RMSNorm, rotary positions and untied input/output embeddings:

* ``mixtral-8x7b`` (mistralai/Mixtral-8x7B-v0.1; Jiang et al. 2024, arXiv 2401.04088, Table 1):
  num_hidden_layers 32, hidden_size 4096, intermediate_size 14336 (each expert),
  num_local_experts 8, num_experts_per_tok 2, num_attention_heads 32, num_key_value_heads 8
  (head dim 128: q/o 4096 x 4096, k/v 4096 x 1024), vocab_size 32000, every layer MoE, no
  shared expert. Published totals: 46.7B parameters, 12.9B active per token.
* ``qwen3-30b-a3b`` (Qwen/Qwen3-30B-A3B): num_hidden_layers 48, hidden_size 2048,
  moe_intermediate_size 768, num_experts 128, num_experts_per_tok 8, num_attention_heads 32,
  num_key_value_heads 4, head_dim 128 (q 2048 x 4096, k/v 2048 x 512, o 4096 x 2048, q/k
  RMSNorm of 128), vocab_size 151936, decoder_sparse_step 1 and no mlp_only_layers (every layer
  MoE), no shared expert. Published totals: 30.5B parameters, 3.3B activated.
* ``deepseek-v3`` (deepseek-ai/DeepSeek-V3; DeepSeek-AI 2024, arXiv 2412.19437): num_hidden_layers
  61 of which first_k_dense_replace 3 are dense (intermediate_size 18432), hidden_size 7168,
  moe_intermediate_size 2048, n_routed_experts 256, num_experts_per_tok 8, n_shared_experts 1,
  multi-head latent attention with num_attention_heads 128, q_lora_rank 1536, kv_lora_rank 512,
  qk_nope_head_dim 128, qk_rope_head_dim 64, v_head_dim 128, vocab_size 129280. Published
  totals: 671B parameters, 37B activated (the 14B multi-token-prediction module is not
  modelled). Trained with 64-way expert parallelism spanning 8 nodes (the report, Sec. 3.2):
  ``recipe_expert_parallel`` 64.

``tests/test_sim.py`` checks that these shapes give the published totals within 1 % (total)
and 3 % (active; publications round it and differ on counting embeddings). Built-in shapes
default to sequence length 4096, micro-batch 1 and bf16; batch and slots are set by the
caller (the command line: ``--micro-batches``, ``--slots-per-rank``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

__all__ = ["ModelShape", "load_model", "MODEL_NAMES", "BUILTIN_MODELS", "CONFIG_DIR", "model_names"]

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
    replica_counts: str = "load"  # SwiftMoE's --swiftmoe-replica-counts: load (default) | paper
    attention_params: Optional[int] = None  # per layer (GQA, MLA); None: 4 h^2
    attention_width: Optional[int] = None  # (heads x qk dim + heads x v dim) / 2 for score FLOPs; None: h
    shared_expert_ffn_hidden_size: int = 0  # total FFN width of the shared experts of an MoE layer
    recipe_expert_parallel: Optional[int] = None  # EP of the model's public training recipe, if any

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
    def shared_expert_params(self) -> int:
        """The shared experts of one MoE layer (SwiGLU like the routed ones): dense parameters."""
        f = self.shared_expert_ffn_hidden_size
        return ((2 * f if self.swiglu else f) + f) * self.hidden_size

    @property
    def layer_attention_params(self) -> int:
        return 4 * self.hidden_size ** 2 if self.attention_params is None else self.attention_params

    def layer_matmul_params(self, layer: int) -> int:
        """Non-expert parameters a token multiplies with in ``layer``: attention plus the dense
        MLP (dense layer) or router and shared experts (MoE layer)."""
        if self.moe_layers[layer]:
            mlp = self.num_experts * self.hidden_size + self.shared_expert_params
        else:
            mlp = self.dense_mlp_params
        return self.layer_attention_params + mlp

    def layer_dense_params(self, layer: int) -> int:
        """Every non-expert parameter of ``layer`` (its two norms included)."""
        return self.layer_matmul_params(layer) + 2 * self.norm_params * self.hidden_size

    def layer_dense_flops_per_token(self, layer: int) -> float:
        """Forward FLOPs per token of ``layer`` outside its routed experts: 2 per matmul
        parameter plus the attention scores and values, 4 s x attention width."""
        width = self.hidden_size if self.attention_width is None else self.attention_width
        return 2.0 * self.layer_matmul_params(layer) + 4.0 * self.seq_length * width

    @property
    def dense_matmul_params(self) -> int:
        """Parameters every token multiplies with (excluding experts): attention, dense MLPs,
        routers, shared experts and the output layer (tied or not, the logits are a ``V x h`` matmul)."""
        return sum(self.layer_matmul_params(j) for j in range(self.num_layers)) + self.vocab_size * self.hidden_size

    @property
    def dense_params(self) -> int:
        """Every non-expert parameter: what ZeRO-1 reduce-scatters and all-gathers."""
        h = self.hidden_size
        norms = self.norm_params * h * (2 * self.num_layers + 1)  # 2 per layer + the final one
        input_embeddings = 0 if self.tied_embeddings else self.vocab_size * h  # tied: the output layer's
        return self.dense_matmul_params + input_embeddings + self.position_embeddings * h + norms

    @property
    def dense_flops_per_token(self) -> float:
        """Forward + backward FLOPs per token outside the experts (Narayanan et al. 2021):
        3 x the forward FLOPs of every layer and of the logits."""
        layers = sum(self.layer_dense_flops_per_token(j) for j in range(self.num_layers))
        return 3.0 * (layers + 2.0 * self.vocab_size * self.hidden_size)

    @property
    def total_params(self) -> int:
        return self.dense_params + self.num_moe_layers * self.num_experts * self.expert_params

    @property
    def active_params(self) -> int:
        """Parameters one token uses: every dense parameter plus top-k experts per MoE layer."""
        return self.dense_params + self.num_moe_layers * self.topk * self.expert_params

    @property
    def tokens(self) -> int:
        """Tokens per iteration (global batch x sequence length)."""
        return self.global_batch_size * self.seq_length

    def summary(self) -> str:
        dtype = {2: "bf16", 4: "fp32"}.get(self.param_bytes, f"{self.param_bytes}-byte")
        shared = f" + {self.shared_expert_params / 1e6:.1f}M shared" if self.shared_expert_params else ""
        return (
            f"{self.name}: {self.num_layers} layers ({self.num_moe_layers} MoE), hidden {self.hidden_size}, "
            f"{self.num_experts} experts top-{self.topk} of {self.expert_params / 1e6:.2f}M params{shared}, "
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


def _builtin(name: str, layers: int, hidden: int, expert_ffn: int, experts: int, topk: int, vocab: int,
             attention: int, attention_width: int, dense_ffn: int = 0, dense_layers: int = 0,
             shared_ffn: int = 0, recipe_ep: Optional[int] = None) -> ModelShape:
    return ModelShape(
        name=name, num_layers=layers, hidden_size=hidden, ffn_hidden_size=dense_ffn or expert_ffn,
        moe_ffn_hidden_size=expert_ffn, num_experts=experts, topk=topk, seq_length=4096,
        global_batch_size=1024, micro_batch_size=1, slots_per_rank=1, vocab_size=vocab,
        moe_layers=(0,) * dense_layers + (1,) * (layers - dense_layers), param_bytes=2, swiglu=True,
        tied_embeddings=False, position_embeddings=0, norm_params=1, attention_params=attention,
        attention_width=attention_width, shared_expert_ffn_hidden_size=shared_ffn,
        recipe_expert_parallel=recipe_ep,
    )


#: Public MoE shapes (sources in the module docstring). Attention parameters per layer:
#: GQA q/o h x (heads x 128) + k/v h x (kv heads x 128) (+ q/k norms for Qwen3); DeepSeek-V3's
#: MLA q_a (h x 1536) + q_b (1536 x 128 x 192) + kv_a (h x 576) + kv_b (512 x 128 x 256) + o
#: (128 x 128 x h) + the two latent norms.
BUILTIN_MODELS = {
    "mixtral-8x7b": _builtin("mixtral-8x7b", 32, 4096, 14336, 8, 2, 32000,
                             attention=2 * 4096 * 4096 + 2 * 4096 * 1024, attention_width=4096),
    "qwen3-30b-a3b": _builtin("qwen3-30b-a3b", 48, 2048, 768, 128, 8, 151936,
                              attention=2 * 2048 * 4096 + 2 * 2048 * 512 + 2 * 128, attention_width=4096),
    "deepseek-v3": _builtin("deepseek-v3", 61, 7168, 2048, 256, 8, 129280,
                            attention=7168 * 1536 + 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 + 512 * 128 * 256
                            + 128 * 128 * 7168,
                            attention_width=(128 * 192 + 128 * 128) // 2, dense_ffn=18432, dense_layers=3,
                            shared_ffn=2048, recipe_ep=64),
}


def model_names() -> list[str]:
    return [*MODEL_NAMES, *BUILTIN_MODELS]


def load_model(spec: str | Path, **overrides: Any) -> ModelShape:
    """A :class:`ModelShape` from a model name (``gpt-small|gpt-medium|gpt-large`` configs, or a
    built-in public shape of :data:`BUILTIN_MODELS`) or a
    training config YAML (keys are flag names, dashes or underscores). ``overrides`` are
    ModelShape fields (``num_experts=8``, ``global_batch_size=1024``...); ``None`` keeps the
    config's value. Defaults as Megatron-LM / this program: ffn 4h (SwiGLU: int(8h/3/64)*64),
    moe-ffn = ffn, every layer MoE, vocabulary 8192 padded to a multiple of 128, micro-batch 1,
    global batch = micro-batch, 1 slot per rank, fp32 unless bf16/fp16.
    """
    if str(spec) in BUILTIN_MODELS:
        shape = BUILTIN_MODELS[str(spec)]
        fields = {f.name for f in dataclasses.fields(ModelShape)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"unknown model overrides {unknown}")
        return shape.replace(**{k: v for k, v in overrides.items() if v is not None})
    import yaml

    path = Path(MODEL_NAMES.get(str(spec), spec))
    if not path.is_absolute() and not path.exists() and (CONFIG_DIR / path).exists():
        path = CONFIG_DIR / path
    if not path.is_file():
        raise ValueError(f"model {spec!r}: not a model name ({', '.join(model_names())}) nor a config file")
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
        replica_counts=str(cfg.get("swiftmoe_replica_counts", "load")),
    )
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"unknown model overrides {unknown}")
    fields.update({k: v for k, v in overrides.items() if v is not None})
    if "moe_layers" not in overrides and fields["num_layers"] != num_layers:
        fields["moe_layers"] = _moe_layer_pattern(cfg.get("moe_layer_freq", 1), fields["num_layers"])
    return ModelShape(**fields)
