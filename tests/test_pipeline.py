"""Pipeline parallelism in the training program: 4 CPU ranks as 2 stages x 2 data-parallel ranks.

Megatron's 1F1B schedule over gloo, 4 layers (2 per stage), tied embeddings (the word embedding
on the first stage, its copy on the last), the same mock data everywhere.

Tolerance. The runs compared below compute the same math in other orders: 2 stages x 2 ranks
accumulate 4 micro-batches per rank and reduce over 2 ranks where 1 stage x 4 ranks accumulate
2 and reduce over 4; SwiftMoE sums an expert's gradient over its replicas and computes experts
in GEMMs of other token counts than the static baseline. In fp32 each such order changes a
result by about one rounding (~6e-8 relative); over these 6 iterations the runs agree to
<= 6e-8 relative (lm loss <= 2.1e-8, gradient norm <= 1.3e-8, aux loss <= 6e-8, measured).
The tests allow rtol 1e-6 + atol 1e-7, about 20x that. A real bug is far outside it: without
the all-reduce of the tied embedding's gradients the loss of iteration 2 moves by 1.5e-2;
counting the last stage's copy of the embedding in the gradient norm moves the norm by 31%
(and, the gradients being clipped at 0.5, the loss of iteration 6 by 5e-4).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_failures import PROGRAM, torchrun
from tests.test_training import pretrain

RANKS = 4
GLOBAL_BATCH, SEQ, TOPK = 8, 32, 2
FLAGS = [
    "--mock-data", "--vocab-size", "256", "--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4",
    "--ffn-hidden-size", "64", "--seq-length", str(SEQ), "--micro-batch-size", "1",
    "--global-batch-size", str(GLOBAL_BATCH), "--num-experts", "4", "--moe-router-topk", str(TOPK),
    "--moe-aux-loss-coeff", "1e-2", "--lr", "3e-3", "--clip-grad", "0.5",  # gradient norms are ~0.6: clipped
    "--swiftmoe-slots-per-rank", "3", "--log-interval", "1",
    "--no-progress",
]
TWO_STAGES = ["--pipeline-model-parallel-size", "2"]
NO_DROPOUT = ["--hidden-dropout", "0", "--attention-dropout", "0"]  # the stages' dropout seeds differ (Megatron's rule)
RTOL, ATOL = 1e-6, 1e-7


def assert_same_training(got: list[dict], want: list[dict]) -> None:
    assert [r["iteration"] for r in got] == [r["iteration"] for r in want]
    for key in ("lm_loss", "grad_norm", "aux_loss"):
        torch.testing.assert_close(torch.tensor([r[key] for r in got]), torch.tensor([r[key] for r in want]),
                                   rtol=RTOL, atol=ATOL, msg=key)


@pytest.mark.one_version  # the Megatron-LM path checks pipeline parallelism against 0.19
def test_two_stages_train_like_one_stage_and_like_the_static_baseline(tmp_path):
    flags = [*FLAGS, *NO_DROPOUT, "--train-iters", "6", "--eval-iters", "0"]
    swift = pretrain(tmp_path, "pp2_swift", RANKS, *flags, *TWO_STAGES, "--swiftmoe")
    static = pretrain(tmp_path, "pp2_static", RANKS, *flags, *TWO_STAGES, "--no-swiftmoe")
    one_stage = pretrain(tmp_path, "pp1_swift", RANKS, *flags, "--swiftmoe")
    assert_same_training(swift, static)
    assert_same_training(swift, one_stage)
    # Every stage's MoE layers are reported, in layer order: the same routing as on one stage.
    for record, reference in zip(swift, one_stage):
        assert len(record["layers"]) == 4
        assert [layer["tokens_per_expert"] for layer in record["layers"]] == [
            layer["tokens_per_expert"] for layer in reference["layers"]]
        for layer in record["layers"]:
            assert sum(layer["tokens_per_expert"]) == TOPK * GLOBAL_BATCH * SEQ  # every pair routed ...
            assert len(layer["tokens_per_rank"]) == 2  # ... over the stage's 2 data-parallel ranks ...
            assert sum(layer["tokens_per_rank"]) == TOPK * GLOBAL_BATCH * SEQ  # ... and computed once
            assert sum(layer["replicas_per_expert"]) == 2 * 3
    replicas = {tuple(layer["replicas_per_expert"]) for r in swift for layer in r["layers"]}
    assert len(replicas) > 1, "SwiftMoE never changed its replica counts"


@pytest.mark.one_version
def test_a_stage_without_moe_layers(tmp_path):
    # Layers 1-2 dense (the first stage), 3-4 MoE: 2 stages x 1 rank against 1 rank.
    flags = [*FLAGS, *NO_DROPOUT, "--train-iters", "4", "--eval-iters", "0", "--global-batch-size", "4",
             "--moe-layer-freq", "[0,0,1,1]", "--swiftmoe-slots-per-rank", "4", "--swiftmoe"]
    two_stages = pretrain(tmp_path, "pp2", 2, *flags, *TWO_STAGES)
    one_stage = pretrain(tmp_path, "pp1", 1, *flags)
    assert_same_training(two_stages, one_stage)
    assert [len(r["layers"]) for r in two_stages] == [2] * 4


@pytest.mark.one_version
def test_two_stage_resume_continues_exactly(tmp_path):
    # With dropout and evaluation: every stage's RNG states and shards must continue.
    one_stage = [*FLAGS, "--swiftmoe", "--train-iters", "6", "--eval-interval", "3", "--eval-iters", "1",
                 "--hidden-dropout", "0.1", "--attention-dropout", "0.1"]
    flags = [*one_stage, *TWO_STAGES]
    whole = pretrain(tmp_path, "whole", RANKS, *flags)
    checkpoint = tmp_path / "ckpt"
    first = pretrain(tmp_path, "resumed", RANKS, *flags, "--save", str(checkpoint), "--save-interval", "3",
                     "--exit-interval", "3")
    assert [r["iteration"] for r in first] == [1, 2, 3]
    metadata = json.loads((checkpoint / "iter_0000003" / "metadata.json").read_text())
    assert metadata["pipeline_model_parallel_size"] == 2 and len(metadata["files"]) == RANKS
    resumed = pretrain(tmp_path, "resumed", RANKS, *flags, "--load", str(checkpoint), "--save", str(checkpoint),
                       "--save-interval", "3")
    assert [r["iteration"] for r in resumed] == list(range(1, 7))
    for key in ("lm_loss", "grad_norm", "aux_loss", "lr", "valid_lm_loss", "layers"):
        assert [r.get(key) for r in resumed] == [r.get(key) for r in whole], key
    assert [r["iteration"] for r in whole if "valid_lm_loss" in r] == [3, 6]

    # The same 4 ranks as one stage cannot take these files: the settings check says why.
    done, _ = torchrun(tmp_path, RANKS, *PROGRAM, *one_stage, "--load", str(checkpoint),
                       "--metrics-path", str(tmp_path / "mismatch.jsonl"))
    assert done.returncode != 0
    assert "pipeline_model_parallel_size: checkpoint 2 vs now 1" in done.out, done.out[-3000:]
    assert Path(checkpoint / "latest_checkpointed_iteration.txt").read_text() == "6"
