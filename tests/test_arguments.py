"""Tests for megatron_swiftmoe.training.arguments: flags, YAML configs, derived defaults, validation."""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_swiftmoe.training import arguments as A
from megatron_swiftmoe.core.config import SwiftMoEConfig

pytestmark = pytest.mark.one_version  # not version-dependent: CI's first environment only

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# A small valid MoE command line (SwiftMoE on 2 ranks).
BASE = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "32", "--micro-batch-size", "2", "--train-iters", "100",
    "--lr", "1e-3", "--num-experts", "4", "--swiftmoe",
]


@pytest.fixture(autouse=True)
def _no_cuda(monkeypatch):
    monkeypatch.setattr(A, "_cuda_available", lambda: False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)


def parse(*extra: str, world_size: int = 2) -> argparse.Namespace:
    return A.parse_args([*BASE, *extra], world_size=world_size)


def parse_error(capsys, argv: list[str], world_size: int = 2) -> str:
    with pytest.raises(SystemExit) as exc:
        A.parse_args(argv, world_size=world_size)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err
    return err


def write_yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


def test_full_command_line(tmp_path):
    load = tmp_path / "ckpt"
    load.mkdir()
    args = A.parse_args(
        [
            "--num-layers", "4", "--hidden-size", "128", "--ffn-hidden-size", "384",
            "--num-attention-heads", "8", "--seq-length", "256", "--max-position-embeddings", "512",
            "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
            "--untie-embeddings-and-output-weights", "--init-method-std", "0.01",
            "--hidden-dropout", "0.0", "--attention-dropout", "0.05",
            "--micro-batch-size", "2", "--global-batch-size", "32", "--train-iters", "500",
            "--seed", "7", "--eval-interval", "50", "--eval-iters", "3", "--log-interval", "5",
            "--exit-interval", "400",
            "--lr", "3e-4", "--min-lr", "3e-5", "--lr-decay-style", "cosine", "--lr-decay-iters", "450",
            "--lr-warmup-iters", "20", "--weight-decay", "0.1", "--clip-grad", "0.5",
            "--adam-beta1", "0.8", "--adam-beta2", "0.95", "--adam-eps", "1e-6",
            "--bf16", "--initial-loss-scale", "65536", "--loss-scale-window", "500", "--min-loss-scale", "2",
            "--num-experts", "8", "--moe-ffn-hidden-size", "192", "--moe-router-topk", "2",
            "--moe-router-score-function", "sigmoid", "--moe-aux-loss-coeff", "1e-2",
            "--moe-z-loss-coeff", "1e-3", "--moe-router-load-balancing-type", "seq_aux_loss",
            "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "1e-4",
            "--moe-layer-freq", "([0]+[1]*3)",
            "--mock-data", "--split", "90,5,5", "--vocab-size", "1000", "--num-workers", "0",
            "--save", str(tmp_path / "out"), "--load", str(load), "--save-interval", "100",
            "--no-load-optim", "--no-load-rng",
            "--tensorboard-dir", str(tmp_path / "tb"), "--wandb-project", "p", "--wandb-exp-name", "e",
            "--metrics-path", str(tmp_path / "m.jsonl"), "--no-progress", "--log-load-interval", "25",
            "--swiftmoe", "--swiftmoe-slots-per-rank", "3", "--swiftmoe-placement", "contiguous",
            "--swiftmoe-grouped-gemm", "off",
        ],
        world_size=4,
    )
    assert (args.num_layers, args.hidden_size, args.ffn_hidden_size) == (4, 128, 384)
    assert args.max_position_embeddings == 512 and args.position_embedding_type == "rope"
    assert args.normalization == "RMSNorm" and args.swiglu and args.untie_embeddings_and_output_weights
    assert args.add_bias_linear is False
    assert args.global_batch_size == 32 and args.num_micro_batches == 4
    assert (args.seed, args.eval_interval, args.eval_iters, args.exit_interval) == (7, 50, 3, 400)
    assert (args.lr, args.min_lr, args.lr_decay_style, args.lr_decay_iters) == (3e-4, 3e-5, "cosine", 450)
    assert args.lr_warmup_iters == 20 and args.adam_beta2 == 0.95 and args.adam_eps == 1e-6
    assert args.bf16 and not args.fp16 and args.params_dtype == torch.bfloat16
    assert args.initial_loss_scale == 65536.0 and args.min_loss_scale == 2.0
    assert args.moe_layer_freq == [0, 1, 1, 1] and args.moe_ffn_hidden_size == 192
    assert args.moe_router_load_balancing_type == "seq_aux_loss" and args.moe_z_loss_coeff == 1e-3
    assert args.tokenizer_type == "NullTokenizer" and args.vocab_size == 1000
    assert args.load == str(load) and args.no_load_optim and args.no_load_rng and not args.finetune
    assert args.no_progress and args.log_load_interval == 25
    assert args.world_size == args.data_parallel_size == 4
    assert A.swiftmoe_config_from_args(args) == SwiftMoEConfig(3, "contiguous", "off")


def test_derived_defaults():
    args = parse()
    assert args.ffn_hidden_size == 256  # 4 * hidden
    assert args.moe_ffn_hidden_size == 256
    assert args.max_position_embeddings == 32
    assert args.global_batch_size == 4 and args.num_micro_batches == 1  # micro * world size
    assert args.lr_decay_iters == 100 and args.lr_warmup_iters == 0
    assert args.moe_layer_freq == [1, 1]
    assert args.moe_token_dispatcher_type == "allgather"  # no CUDA
    assert args.moe_token_drop_policy is None
    assert args.tokenizer_type == "SentencePieceTokenizer" and args.vocab_size == A.DEFAULT_VOCAB_SIZE
    assert args.metrics_path.startswith("runs" + os.sep) and args.metrics_path.endswith("metrics.jsonl")
    assert args.log_load_interval == args.log_interval == 100
    assert args.add_bias_linear is False and args.params_dtype == torch.float32
    # Megatron defaults kept.
    assert (args.seed, args.init_method_std, args.hidden_dropout, args.weight_decay) == (1234, 0.02, 0.1, 0.01)
    assert (args.lr_decay_style, args.min_lr, args.clip_grad, args.adam_beta2) == ("linear", 0.0, 1.0, 0.999)
    assert args.initial_loss_scale == 2.0**32 and args.moe_router_topk == 2 and args.split == "969,30,1"


def test_derived_swiglu_ffn_and_warmup_fraction_and_freq():
    args = parse("--swiglu", "--lr-warmup-fraction", "0.1", "--num-layers", "6", "--moe-layer-freq", "2")
    assert args.ffn_hidden_size == int(4 * 64 * 2 / 3 / 64) * 64 == 128
    assert args.lr_warmup_iters == 10
    assert args.moe_layer_freq == [1, 0, 1, 0, 1, 0]


def test_metrics_path_under_save(tmp_path):
    assert parse("--save", str(tmp_path)).metrics_path == str(tmp_path / "metrics.jsonl")


def test_world_size_from_environment(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert A.parse_args(BASE).world_size == 4
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert "--num-experts (4) must be divisible by the world size (8)" in parse_error(
        capsys, [*BASE, "--no-swiftmoe"], world_size=None
    )


def test_dispatcher_default_on_cuda(monkeypatch):
    monkeypatch.setattr(A, "_cuda_available", lambda: True)
    args = parse()
    assert args.moe_token_dispatcher_type == "alltoall"


def test_bias_flags():
    assert parse("--disable-bias-linear").add_bias_linear is False
    args = parse("--no-swiftmoe", "--add-bias-linear")
    assert args.add_bias_linear is True
    assert A.transformer_config_from_args(args).add_bias_linear is True


def test_help_renders():
    text = A.build_parser().format_help()
    for title in ["network size", "regularization and optimizer", "training", "learning rate", "moe",
                  "mixed precision", "data", "checkpointing", "distributed", "logging",
                  "SwiftMoE: per-iteration expert replication"]:
        assert title + ":" in text
    assert "--swiftmoe-slots-per-rank" in text and "Defaults that differ from Megatron-LM" in text


# --------------------------------------------------------------------------------------------
# YAML configs
# --------------------------------------------------------------------------------------------


def test_yaml_with_command_line_override(tmp_path):
    path = write_yaml(tmp_path, """
num-layers: 2
hidden_size: 64            # underscores work too
num-attention-heads: 4
seq-length: 32
micro-batch-size: 2
train-iters: 100
lr: 1e-3                   # YAML reads this as a string; argparse's float() converts it
num-experts: 4
swiftmoe: true
moe-layer-freq: [1, 0]     # a YAML list is a pattern too
data-path: null            # null keeps the default
disable-bias-linear: true
moe-z-loss-coeff: 1.0e-3
""")
    args = A.parse_args(["--config", path, "--lr", "5e-4", "--num-layers", "2"], world_size=2)
    assert args.lr == 5e-4  # command line wins
    assert args.hidden_size == 64 and args.num_layers == 2 and args.moe_z_loss_coeff == 1e-3
    assert args.swiftmoe and args.moe_layer_freq == [1, 0] and args.data_path is None
    assert args.config == path and args.add_bias_linear is False
    assert A.parse_args(["--config", path], world_size=2).lr == 1e-3
    # A boolean set in the file is turned off with the --no- form.
    assert A.parse_args(["--config", path, "--no-swiftmoe"], world_size=2).swiftmoe is False


def test_yaml_exclusive_settings_command_line_wins(tmp_path):
    path = write_yaml(tmp_path, "bf16: true\nlr-warmup-fraction: 0.1\nmock-data: true\n")
    args = A.parse_args([*BASE, "--config", path, "--fp16", "--lr-warmup-iters", "5"], world_size=2)
    assert args.fp16 and not args.bf16 and args.lr_warmup_fraction is None and args.lr_warmup_iters == 5
    args = A.parse_args([*BASE, "--config", path, "--no-fp16"], world_size=2)
    assert args.bf16 and not args.fp16 and args.lr_warmup_iters == 10 and args.mock_data


def test_yaml_unknown_key_suggests(tmp_path, capsys):
    path = write_yaml(tmp_path, "num-layer: 2\n")
    err = parse_error(capsys, ["--config", path])
    assert f"--config {path}: unknown key 'num-layer'; did you mean 'num-layers'?" in err
    path = write_yaml(tmp_path, "swiftmoe_slot_per_rank: 2\n")
    assert "did you mean 'swiftmoe-slots-per-rank'?" in parse_error(capsys, ["--config", path])


@pytest.mark.parametrize(
    "line, expected",
    [
        ("hidden-size: 64.5", "key 'hidden-size' expects an integer"),
        ("hidden-size: true", "key 'hidden-size' expects an integer"),
        ("lr: fast", "key 'lr' expects a number"),
        ("swiftmoe: 1", "key 'swiftmoe' expects true or false"),
        ("bf16: 'yes please'", "key 'bf16' expects true or false"),
        ("lr-decay-style: exponential", "key 'lr-decay-style' expects one of constant, linear"),
        ("num-experts: [4]", "key 'num-experts' expects an integer"),
        ("moe-layer-freq: \"[2]\"", "key 'moe-layer-freq' expects an integer >= 1 or a list expression"),
    ],
)
def test_yaml_wrong_type(tmp_path, capsys, line, expected):
    path = write_yaml(tmp_path, line + "\n")
    err = parse_error(capsys, [*BASE, "--config", path])
    assert expected in err and path in err


def test_yaml_file_errors(tmp_path, capsys):
    assert "cannot read the file" in parse_error(capsys, ["--config", str(tmp_path / "missing.yaml")])
    assert "expected a mapping" in parse_error(capsys, ["--config", write_yaml(tmp_path, "- 1\n- 2\n")])
    assert "not valid YAML" in parse_error(capsys, ["--config", write_yaml(tmp_path, "a: [1\n")])
    err = parse_error(capsys, ["--config", write_yaml(tmp_path, "num-layers: 2\nnum_layers: 3\n")])
    assert "keys 'num-layers' and 'num_layers' both set num_layers" in err
    assert "do not nest" in parse_error(capsys, ["--config", write_yaml(tmp_path, "config: x.yaml\n")])


def test_load_config_raises_arguments_error(tmp_path):
    with pytest.raises(A.ArgumentsError, match="unknown key 'hiden-size'"):
        A.load_config(write_yaml(tmp_path, "hiden-size: 3\n"), A.build_parser())


# --------------------------------------------------------------------------------------------
# Validation: every error names the flag
# --------------------------------------------------------------------------------------------


def _without(flag: str) -> list[str]:
    i = BASE.index(flag)
    return BASE[:i] + BASE[i + 2:]


def test_required_flags(capsys):
    err = parse_error(capsys, [])
    for flag in ["--num-layers", "--hidden-size", "--num-attention-heads", "--seq-length",
                 "--micro-batch-size", "--train-iters", "--lr", "--num-experts"]:
        assert flag in err
    err = parse_error(capsys, _without("--lr"))
    assert "required: --lr (" in err


@pytest.mark.parametrize(
    "extra, world_size, expected",
    [
        (["--hidden-size", "66"], 2, "--hidden-size (66) must be divisible by --num-attention-heads (4)"),
        (["--global-batch-size", "6"], 2, "--global-batch-size (6) must be a multiple of --micro-batch-size (2)"),
        (["--bf16", "--fp16"], 2, "--bf16 and --fp16 are mutually exclusive"),
        (["--min-lr", "1e-2"], 2, "--min-lr (0.01) must be <= --lr (0.001)"),
        (["--lr", "0"], 2, "--lr must be > 0"),
        (["--lr-warmup-iters", "101"], 2, "--lr-warmup-iters gives 101 warmup iterations, more than --train-iters (100)"),
        (["--lr-warmup-iters", "50", "--lr-decay-iters", "40"], 2, "fewer than --lr-decay-iters (40"),
        (["--lr-warmup-iters", "5", "--lr-warmup-fraction", "0.1"], 2, "--lr-warmup-fraction and --lr-warmup-iters are mutually exclusive"),
        (["--lr-decay-style", "WSD"], 2, "--lr-decay-style WSD needs --lr-wsd-decay-iters"),
        (["--moe-router-topk", "5"], 2, "--moe-router-topk (5) must be in [1, --num-experts (4)]"),
        (["--moe-router-topk", "0"], 2, "--moe-router-topk (0) must be in [1"),
        (["--moe-router-topk", "1"], 2, "--moe-router-topk 1 with --moe-router-score-function softmax needs --moe-router-pre-softmax"),
        (["--moe-router-enable-expert-bias"], 2, "--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid"),
        (["--swiftmoe-slots-per-rank", "1"], 2, "--swiftmoe-slots-per-rank (1) * world size (2) = 2 slots is fewer than --num-experts (4)"),
        (["--swiftmoe-slots-per-rank", "0"], 2, "--swiftmoe-slots-per-rank must be >= 1"),
        (["--moe-expert-capacity-factor", "1.0", "--moe-pad-expert-input-to-capacity"], 2,
         "--moe-pad-expert-input-to-capacity is not supported with --swiftmoe"),
        (["--swiftmoe-replan-interval", "0"], 2, "--swiftmoe-replan-interval must be >= 1"),
        (["--data-path", "a", "b"], 2, "--data-path: dataset blends (a b) are not supported yet"),
        (["--add-bias-linear"], 2, "--add-bias-linear is not supported with --swiftmoe"),
        (["--no-swiftmoe"], 3, "--num-experts (4) must be divisible by the world size (3) without --swiftmoe"),
        (["--no-swiftmoe", "--moe-token-dispatcher-type", "alltoall"], 2, "--moe-token-dispatcher-type alltoall needs CUDA"),
        (["--no-swiftmoe", "--moe-token-drop-policy", "position"], 2, "--moe-token-drop-policy only applies with --moe-expert-capacity-factor"),
        (["--no-swiftmoe", "--moe-pad-expert-input-to-capacity"], 2, "--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor"),
        (["--no-swiftmoe", "--moe-expert-capacity-factor", "-1"], 2, "--moe-expert-capacity-factor must be > 0"),
        (["--moe-layer-freq", "[1,1,1]"], 2, "--moe-layer-freq gives a pattern of 3 layers but --num-layers is 2"),
        (["--moe-layer-freq", "[0,0]"], 2, "--moe-layer-freq makes no layer an MoE layer"),
        (["--save-interval", "10"], 2, "--save-interval needs --save"),
        (["--finetune"], 2, "--finetune needs --load"),
        (["--load-fallback"], 2, "--load-fallback needs --load"),
        (["--distributed-timeout-minutes", "0"], 2, "--distributed-timeout-minutes must be > 0 (got 0.0)"),
        (["--tokenizer-type", "NullTokenizer", "--data-path", "x", "--vocab-size", "9", "--tokenizer-model", "y"], 2, "--tokenizer-model is for SentencePieceTokenizer"),
        (["--tokenizer-type", "NullTokenizer", "--data-path", "x"], 2, "--tokenizer-type NullTokenizer needs --vocab-size"),
        (["--tokenizer-type", "NullTokenizer"], 2, "--tokenizer-type NullTokenizer cannot tokenize the built-in text corpus"),
        (["--data-path", "x"], 2, "--data-path with --tokenizer-type SentencePieceTokenizer needs --tokenizer-model"),
        (["--data-path", "x", "--mock-data"], 2, "--data-path and --mock-data are mutually exclusive"),
        (["--tokenizer-model", "/nonexistent/spm.model"], 2, "--tokenizer-model /nonexistent/spm.model: no such file"),
        (["--split", "a,b"], 2, "--split must be up to three non-negative numbers"),
        (["--eval-iters", "-1"], 2, "--eval-iters must be >= 0"),
        (["--eval-interval", "0"], 2, "--eval-interval must be >= 1"),
        (["--micro-batch-size", "0"], 2, "--micro-batch-size must be >= 1"),
        (["--hidden-dropout", "1.0"], 2, "--hidden-dropout must be in [0, 1)"),
        (["--seq-length", "64", "--max-position-embeddings", "32"], 2, "--max-position-embeddings (32) must be >= --seq-length (64)"),
        (["--wandb-exp-name", "x"], 2, "--wandb-exp-name needs --wandb-project"),
        (["--min-loss-scale", "8", "--initial-loss-scale", "4"], 2, "--min-loss-scale (8.0) must be <= --initial-loss-scale (4.0)"),
        (["--pipeline-model-parallel-size", "3"], 4,
         "--pipeline-model-parallel-size (3) must divide the world size (4)"),
        (["--pipeline-model-parallel-size", "0"], 2, "--pipeline-model-parallel-size must be >= 1, got 0"),
        (["--pipeline-model-parallel-size", "2", "--num-layers", "3", "--moe-layer-freq", "1"], 4,
         "--num-layers (3) must be divisible by --pipeline-model-parallel-size (2)"),
        (["--tensor-model-parallel-size", "2"], 2,
         "--tensor-model-parallel-size 2 is not supported: this program does not implement it; Megatron-LM's own "
         "pretrain_gpt.py runs it with --swiftmoe"),
        (["--pipeline-model-parallel-size", "2", "--swiftmoe-slots-per-rank", "1"], 4,
         "--swiftmoe-slots-per-rank (1) * data-parallel size (2 = world size 4 / --pipeline-model-parallel-size 2) "
         "= 2 slots is fewer than --num-experts (4)"),
        (["--pipeline-model-parallel-size", "2", "--no-swiftmoe"], 6,
         "--num-experts (4) must be divisible by the data-parallel size (3 = world size 6 / "
         "--pipeline-model-parallel-size 2) without --swiftmoe"),
        (["--pipeline-model-parallel-size", "2", "--global-batch-size", "6"], 8,
         "--global-batch-size (6) must be a multiple of --micro-batch-size (2) * data-parallel size (4, the world "
         "size / --pipeline-model-parallel-size 2) = 8"),
    ],
)
def test_validation_errors(capsys, extra, world_size, expected):
    err = parse_error(capsys, [*BASE, *extra], world_size=world_size)
    assert expected in err, err


def test_pipeline_stages():
    # 8 ranks as 2 stages x 4 data-parallel ranks: batch, experts and SwiftMoE slots per stage.
    args = parse("--pipeline-model-parallel-size", "2", world_size=8)
    assert (args.world_size, args.data_parallel_size) == (8, 4)
    assert args.global_batch_size == 8 and args.num_micro_batches == 1  # micro * data-parallel size
    c = A.transformer_config_from_args(args)
    assert c.pipeline_model_parallel_size == 2 and c.pipeline_dtype == torch.float32
    assert c.expert_model_parallel_size == 1
    static = A.transformer_config_from_args(parse("--pipeline-model-parallel-size", "2", "--no-swiftmoe", "--bf16",
                                                  world_size=8))
    assert static.expert_model_parallel_size == 4 and static.pipeline_dtype == torch.bfloat16
    # 4 experts on 2 data-parallel ranks: 2 slots per rank suffice (the world size would allow 1).
    assert parse("--pipeline-model-parallel-size", "2", "--swiftmoe-slots-per-rank", "2",
                 world_size=4).data_parallel_size == 2
    assert parse().pipeline_model_parallel_size == 1 and parse().tensor_model_parallel_size == 1


def test_load_must_exist(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert f"--load {missing}: no such directory" in parse_error(capsys, [*BASE, "--load", str(missing)])
    assert parse("--load", str(tmp_path), "--finetune").finetune
    assert parse("--load", str(tmp_path), "--load-fallback").load_fallback


def test_distributed_timeout():
    assert parse().distributed_timeout_minutes == 10  # Megatron-LM's default
    assert parse("--distributed-timeout-minutes", "0.5").distributed_timeout_minutes == 0.5


def test_validate_args_raises_value_error():
    args = A.build_parser().parse_args([*BASE, "--hidden-size", "66"])
    with pytest.raises(A.ArgumentsError, match="--hidden-size") as exc:
        A.validate_args(args, world_size=2)
    assert isinstance(exc.value, ValueError)


def test_valid_variants():
    # Top-1 with pre-softmax, sigmoid + expert bias, capacity factor on the baseline, WSD, rope.
    parse("--moe-router-topk", "1", "--moe-router-pre-softmax")
    parse("--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias", "--moe-router-topk", "1")
    args = parse("--no-swiftmoe", "--moe-expert-capacity-factor", "1.25", "--moe-pad-expert-input-to-capacity")
    assert args.moe_token_drop_policy == "probs"
    assert A.transformer_config_from_args(args).moe_expert_capacity_factor == 1.25
    parse("--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "20", "--position-embedding-type", "rope")
    parse("--swiftmoe-slots-per-rank", "2")  # 2 ranks x 2 slots = 4 experts exactly


# --------------------------------------------------------------------------------------------
# --moe-layer-freq
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1", 1),
        ("3", 3),
        ("[1,0,1]", [1, 0, 1]),
        ("([0]+[1]*3)", [0, 1, 1, 1]),
        ("([1]*3+[0]*1)*2", [1, 1, 1, 0, 1, 1, 1, 0]),
        ("[1]*(2+1)", [1, 1, 1]),
        ("2*[0,1]", [0, 1, 0, 1]),
    ],
)
def test_moe_layer_freq_parsing(text, expected):
    assert A.moe_layer_freq_type(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os').system('x')",
        "[__import__('os').system('touch /tmp/pwned')]",
        "().__class__.__bases__[0].__subclasses__()",
        "[1]*10**9",
        "[1]*100000000",
        "[x for x in range(3)]",
        "(lambda: [1])()",
        "['1']",
        "[True]",
        "[2, 1]",
        "[1]-[0]",
        "0",
        "-1",
        "[1] * -1 + [1]",
        "[" * 5000 + "]" * 5000,
        "1 if 1 else 0",
    ],
)
def test_moe_layer_freq_rejects(text, monkeypatch, capsys):
    monkeypatch.setattr(os, "system", lambda *a: pytest.fail("os.system was called"))
    with pytest.raises(argparse.ArgumentTypeError):
        A.moe_layer_freq_type(text)
    err = parse_error(capsys, [*BASE, "--moe-layer-freq", text])
    assert "argument --moe-layer-freq" in err


def test_moe_layer_freq_pattern_for_megatron_style_24_layers():
    args = parse("--num-layers", "24", "--moe-layer-freq", "([0]+[1]*23)")
    assert args.moe_layer_freq == [0] + [1] * 23
    assert A.transformer_config_from_args(args).moe_layer_freq == [0] + [1] * 23


# --------------------------------------------------------------------------------------------
# TransformerConfig / SwiftMoEConfig
# --------------------------------------------------------------------------------------------


def test_transformer_config_mapping():
    args = parse(
        "--swiglu", "--ffn-hidden-size", "128", "--moe-ffn-hidden-size", "96", "--bf16",
        "--moe-router-topk", "1", "--moe-router-pre-softmax", "--moe-aux-loss-coeff", "1e-2",
        "--moe-z-loss-coeff", "1e-3", "--normalization", "RMSNorm", "--hidden-dropout", "0.0",
        "--attention-dropout", "0.2", "--init-method-std", "0.01", "--moe-router-load-balancing-type",
        "seq_aux_loss",
    )
    c = A.transformer_config_from_args(args)
    assert (c.num_layers, c.hidden_size, c.ffn_hidden_size, c.num_attention_heads) == (2, 64, 128, 4)
    assert (c.num_moe_experts, c.moe_ffn_hidden_size, c.moe_router_topk) == (4, 96, 1)
    assert c.moe_router_pre_softmax and c.moe_router_score_function == "softmax"
    assert (c.moe_aux_loss_coeff, c.moe_z_loss_coeff) == (1e-2, 1e-3)
    assert c.moe_router_load_balancing_type == "seq_aux_loss"
    assert c.moe_expert_capacity_factor is None and c.moe_token_dispatcher_type == "allgather"
    assert c.gated_linear_unit and c.activation_func is F.silu and c.normalization == "RMSNorm"
    assert (c.hidden_dropout, c.attention_dropout, c.init_method_std) == (0.0, 0.2, 0.01)
    assert c.bf16 and not c.fp16 and c.params_dtype == torch.bfloat16
    assert c.add_bias_linear is False and c.use_cpu_initialization is True
    assert c.expert_model_parallel_size == 1 and c.tensor_model_parallel_size == 1
    assert c.calculate_per_token_loss is False

    base = A.transformer_config_from_args(parse("--no-swiftmoe", "--fp16"))
    assert base.expert_model_parallel_size == 2 and base.fp16 and base.params_dtype == torch.float16
    assert not base.gated_linear_unit and base.activation_func is F.gelu


def test_swiftmoe_on_and_off():
    on = parse()
    assert on.swiftmoe and A.swiftmoe_config_from_args(on) == SwiftMoEConfig(4, "balanced", "auto")
    assert (on.swiftmoe_replica_counts, on.swiftmoe_split) == ("load", "rank")
    paper = parse("--swiftmoe-replica-counts", "paper", "--swiftmoe-split", "replica")
    assert A.swiftmoe_config_from_args(paper) == SwiftMoEConfig(4, replica_counts="paper", split="replica")
    for flag, value in (("--swiftmoe-replica-counts", "even"), ("--swiftmoe-split", "slot")):
        with pytest.raises(SystemExit):
            parse(flag, value)
    off = parse("--no-swiftmoe")
    assert not off.swiftmoe and A.swiftmoe_config_from_args(off) is None
    # Without --swiftmoe the slots need not cover the experts (they are not used).
    assert A.swiftmoe_config_from_args(parse("--no-swiftmoe", "--swiftmoe-slots-per-rank", "1")) is None


def test_gpt_model_kwargs_and_vocab_padding():
    args = parse("--untie-embeddings-and-output-weights", "--position-embedding-type", "rope")
    kwargs = A.gpt_model_kwargs(args)
    assert kwargs["share_embeddings_and_output_weights"] is False
    assert kwargs["position_embedding_type"] == "rope" and kwargs["max_sequence_length"] == 32
    assert A.padded_vocab_size(8000, args) == 8064 and A.padded_vocab_size(8192, args) == 8192


@pytest.mark.parametrize(
    "name, world_size",
    [("tiny_cpu", 2), ("gpt_small_moe", 16), ("gpt_medium_moe", 16), ("gpt_large_moe", 16)],
)
@pytest.mark.parametrize("swiftmoe", [True, False])
def test_shipped_configs(name, world_size, swiftmoe):
    argv = ["--config", str(CONFIGS / f"{name}.yaml")] + ([] if swiftmoe else ["--no-swiftmoe"])
    args = A.parse_args(argv, world_size=world_size)
    assert args.swiftmoe is swiftmoe
    config = A.transformer_config_from_args(args)
    assert config.num_moe_experts == args.num_experts
    assert config.expert_model_parallel_size == (1 if swiftmoe else world_size)
    swift = A.swiftmoe_config_from_args(args)
    if swiftmoe:
        from megatron_swiftmoe.core.layer import _check_supported

        _check_supported(config, world_size, swift)
        assert world_size * swift.slots_per_rank > args.num_experts  # spare slots to replicate into
    else:
        assert swift is None


def test_gpu_configs_follow_the_paper():
    for name, (layers, hidden, heads) in {
        "gpt_small_moe": (12, 768, 12), "gpt_medium_moe": (24, 1024, 16), "gpt_large_moe": (24, 1536, 16),
    }.items():
        args = A.parse_args(["--config", str(CONFIGS / f"{name}.yaml")], world_size=16)
        assert (args.num_layers, args.hidden_size, args.num_attention_heads) == (layers, hidden, heads)
        assert (args.num_experts, args.moe_router_topk, args.swiftmoe_slots_per_rank) == (16, 1, 4)
        assert (args.moe_aux_loss_coeff, args.seq_length, args.global_batch_size) == (1e-5, 512, 64)
        assert args.bf16 and args.swiftmoe


def test_print_args():
    out = io.StringIO()
    A.print_args(parse(), file=out)
    lines = out.getvalue().splitlines()
    assert lines[0] == "------------------------ arguments ------------------------"
    assert lines[-1] == "-------------------- end of arguments ---------------------"
    body = lines[1:-1]
    assert body == sorted(body, key=str.lower)
    assert any(line.startswith("  num_experts ....") and line.endswith(" 4") for line in body)


def test_command_line_turns_off_booleans_from_yaml(tmp_path):
    path = write_yaml(tmp_path, "swiglu: true\nmoe-router-pre-softmax: true\nmock-data: true\n")
    args = A.parse_args([*BASE, "--config", path], world_size=2)
    assert args.swiglu and args.moe_router_pre_softmax and args.mock_data
    args = A.parse_args(
        [*BASE, "--config", path, "--no-swiglu", "--no-moe-router-pre-softmax", "--no-mock-data"], world_size=2
    )
    assert not args.swiglu and not args.moe_router_pre_softmax and not args.mock_data


def test_unknown_flag_suggestion(capsys):
    err = parse_error(capsys, [*BASE, "--num-layer", "3"])
    assert "unrecognized arguments: --num-layer 3" in err and "--num-layer -> --num-layers" in err


@pytest.mark.parametrize("flags", [["--context-parallel-size", "2"], ["--mtp-num-layers", "1"],
                                   ["--recompute-granularity", "full", "--moe-shared-expert-overlap"]])
def test_megatron_lm_features_point_to_the_megatron_lm_path(capsys, flags):
    err = parse_error(capsys, [*BASE, *flags])
    named = [flag for flag in flags if flag.startswith("--")]
    assert f"{', '.join(named)}: this program does not implement it; Megatron-LM's own pretrain_gpt.py runs it" in err, err
