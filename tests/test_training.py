"""The training program end to end: real data, 2-3 CPU ranks launched by torchrun."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from megatron_swiftmoe.training.data import prepare_default_data

TIMEOUT_S = 600


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> list[str]:
    """A small real corpus (60 stdlib modules), its tokenizer and indexed dataset."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:60]
    prefix, model = prepare_default_data(tmp_path_factory.mktemp("data"), vocab_size=512, corpus_files=files)
    return ["--data-path", str(prefix), "--tokenizer-model", str(model), "--split", "95,5,0"]


def model_flags(num_experts: int, slots: int, topk: int = 2) -> list[str]:
    return [
        "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--ffn-hidden-size", "64",
        "--seq-length", "32", "--micro-batch-size", "2", "--num-experts", str(num_experts),
        "--moe-router-topk", str(topk), *(["--moe-router-pre-softmax"] if topk == 1 else []),
        "--moe-aux-loss-coeff", "1e-2", "--hidden-dropout", "0",
        "--attention-dropout", "0", "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine",
        "--lr-warmup-iters", "2", "--swiftmoe-slots-per-rank", str(slots), "--log-interval", "5",
        "--no-progress",
    ]


def pretrain(tmp_path: Path, name: str, ranks: int, *flags: str) -> list[dict]:
    """Run ``torchrun -m megatron_swiftmoe.pretrain_gpt``; return its metrics records."""
    metrics = tmp_path / name / "metrics.jsonl"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
        "-m", "megatron_swiftmoe.pretrain_gpt", "--metrics-path", str(metrics), *flags,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def test_two_rank_training_loss_falls(dataset, tmp_path):
    records = pretrain(
        tmp_path, "run", 2, *dataset, *model_flags(4, 3), "--swiftmoe", "--global-batch-size", "8",
        "--train-iters", "40", "--eval-interval", "20", "--eval-iters", "2",
    )
    losses = [r["lm_loss"] for r in records]
    assert [r["iteration"] for r in records] == list(range(1, 41))
    # Small initial weights give near-uniform predictions over the 512-token vocabulary.
    assert abs(losses[0] - math.log(512)) < 0.3, losses[0]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    assert [r["iteration"] for r in records if "valid_lm_loss" in r] == [20, 40]
    for record in records:
        for layer in record["layers"]:
            routed = sum(layer["tokens_per_expert"])
            assert routed == 2 * 8 * 32  # top-2 x global batch x sequence: every pair routed ...
            assert sum(layer["tokens_per_rank"]) == routed  # ... and computed once
            assert layer["dropped_tokens"] == 0
            assert sum(layer["replicas_per_expert"]) == 2 * 3
            # Per micro-batch routing adds up to the iteration's; static EP replayed on it.
            micro = layer["microbatch_tokens_per_expert"]
            assert len(micro) == 2 and [sum(col) for col in zip(*micro)] == layer["tokens_per_expert"]
            static = [max(sum(m[:2]), sum(m[2:])) / (sum(m) / 2) for m in micro]  # experts 0, 1 | 2, 3
            assert layer["static_max_mean"] == pytest.approx(sum(static) / len(static))
            assert 1.0 <= layer["realised_max_mean"] <= 2.0


EXPERT_BIAS = ["--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias", "--moe-aux-loss-coeff", "0"]


@pytest.mark.one_version
@pytest.mark.parametrize("ranks,num_experts,router", [(2, 4, []), (3, 6, []), (2, 4, EXPERT_BIAS)],
                         ids=["2-ranks", "3-ranks", "2-ranks-expert-bias"])
def test_swiftmoe_and_static_baseline_train_identically(dataset, tmp_path, ranks, num_experts, router):
    # Megatron's default dropout (0.1): both strategies must draw the same dropout masks. With
    # aux-loss-free balancing both must update their routers' expert bias alike.
    flags = [*dataset, *model_flags(num_experts, 3), "--global-batch-size", str(4 * ranks), "--train-iters", "8",
             "--eval-iters", "0", "--hidden-dropout", "0.1", "--attention-dropout", "0.1", *router]
    swift = pretrain(tmp_path, "swift", ranks, *flags, "--swiftmoe")
    static = pretrain(tmp_path, "static", ranks, *flags, "--no-swiftmoe")
    # Same math, different layout: fp32 round-off only (different summation orders).
    for key in ("lm_loss", "grad_norm") + (() if router else ("aux_loss",)):
        torch.testing.assert_close(
            torch.tensor([r[key] for r in swift]), torch.tensor([r[key] for r in static]), rtol=1e-5, atol=1e-6
        )
    replicas = {tuple(r["layers"][0]["replicas_per_expert"]) for r in swift}
    assert len(replicas) > 1, "SwiftMoE never changed its replica counts"
    assert all(set(r["layers"][0]["replicas_per_expert"]) == {1} for r in static)
    # A stock layer's realised load is its static layout's.
    assert all(r["layers"][0]["realised_max_mean"] == r["layers"][0]["static_max_mean"] for r in static)


@pytest.mark.one_version
def test_resume_continues_exactly(dataset, tmp_path):
    # With dropout: the checkpoint's RNG states (stored as tensors and plain lists) must continue the masks.
    flags = [*dataset, *model_flags(4, 3), "--swiftmoe", "--global-batch-size", "8", "--train-iters", "10",
             "--eval-interval", "5", "--eval-iters", "1", "--hidden-dropout", "0.1", "--attention-dropout", "0.1"]
    whole = pretrain(tmp_path, "whole", 2, *flags)
    checkpoint = str(tmp_path / "ckpt")
    first = pretrain(tmp_path, "resumed", 2, *flags, "--save", checkpoint, "--save-interval", "5", "--exit-interval", "5")
    assert [r["iteration"] for r in first] == [1, 2, 3, 4, 5]
    resumed = pretrain(tmp_path, "resumed", 2, *flags, "--load", checkpoint, "--save", checkpoint, "--save-interval", "5")
    assert [r["iteration"] for r in resumed] == list(range(1, 11))  # the metrics file continues
    for key in ("lm_loss", "grad_norm", "lr", "valid_lm_loss"):
        assert [r.get(key) for r in resumed] == [r.get(key) for r in whole], key
    assert [r["layers"] for r in resumed] == [r["layers"] for r in whole]
    assert (Path(checkpoint) / "latest_checkpointed_iteration.txt").read_text() == "10"


@pytest.mark.one_version
def test_capacity_factor_swiftmoe_with_one_slot_per_expert_equals_deepspeed_like(dataset, tmp_path):
    """With N*S == E every expert has one replica, so SwiftMoE's replica-proportional capacity is
    exactly the static per-expert capacity: same drops, same training."""
    flags = [*dataset, *model_flags(4, 2, topk=1), "--global-batch-size", "8", "--train-iters", "6",
             "--eval-iters", "0", "--moe-expert-capacity-factor", "1.0"]
    swift = pretrain(tmp_path, "swift", 2, *flags, "--swiftmoe")
    static = pretrain(tmp_path, "static", 2, *flags, "--no-swiftmoe")
    dropped = [[layer["dropped_tokens"] for layer in r["layers"]] for r in swift]
    assert dropped == [[layer["dropped_tokens"] for layer in r["layers"]] for r in static]
    assert sum(map(sum, dropped)) > 0, "nothing was dropped: the test shows nothing"
    for key in ("lm_loss", "grad_norm"):
        torch.testing.assert_close(
            torch.tensor([r[key] for r in swift]), torch.tensor([r[key] for r in static]), rtol=1e-5, atol=1e-6
        )


@pytest.mark.one_version
def test_flexmoe_like_baseline_runs_and_counts_migrations(dataset, tmp_path):
    records = pretrain(
        tmp_path, "flex", 2, *dataset, *model_flags(4, 3), "--swiftmoe", "--swiftmoe-replan-interval", "4",
        "--moe-expert-capacity-factor", "1.0", "--global-batch-size", "8", "--train-iters", "12", "--eval-iters", "0",
    )
    migrations = [r["bytes_sent"]["expert_migration"] for r in records]
    assert all(m == 0 for i, m in enumerate(migrations, start=1) if i % 4), migrations
    assert any(m > 0 for m in migrations), migrations
    replicas = [tuple(r["layers"][0]["replicas_per_expert"]) for r in records]
    assert all(replicas[i] == replicas[i - 1] for i in range(1, len(replicas)) if i % 4), replicas
