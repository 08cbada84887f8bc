"""SwiftMoE inside Megatron-LM's own ``pretrain_gpt.py``: the patch, training, exactness against
Megatron's static expert parallelism, resume in both checkpoint formats, resharding, and the
unmodified Mixtral launch script. CPU ranks on gloo (see tests/megatron_lm.py)."""

from __future__ import annotations

import math
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.megatron_lm import (
    PRINTED_ABS, REPO, TREES, assert_ok, launch, missing_reason, source_tree, tiny_moe,
)

# fp32 runs: SwiftMoE and the static layer compute every (token, expert) pair with the same
# weights, but sum expert outputs, gradients and the loss in other orders (all-to-all vs
# all-gather dispatch, replicas summed into shards): differences of a few fp32 ulps per step.
RTOL = 1e-5
SWIFTMOE = ["--swiftmoe", "--swiftmoe-slots-per-rank", "3"]


def assert_losses_close(got: dict[int, float], want: dict[int, float], rtol: float = RTOL) -> None:
    assert got.keys() == want.keys(), (got, want)
    for iteration in got:
        assert math.isclose(got[iteration], want[iteration], rel_tol=rtol), (iteration, got, want)


# ---------------------------------------------------------------- the patch


@pytest.mark.one_version
@pytest.mark.parametrize("tree_name", TREES)
def test_patch_applies_once_reverts_and_refuses_unknown_checkouts(tmp_path, tree_name):
    if missing := missing_reason(tree_name):
        pytest.skip(missing)
    source = source_tree(tree_name)  # patching needs no megatron-core: both trees in every environment
    target = tmp_path / "checkout"
    shutil.copytree(source, target)
    for path in target.rglob("*"):
        if path.is_file():
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
    original = (target / "pretrain_gpt.py").read_text()
    apply = ["bash", str(REPO / "patches" / "apply.sh"), str(target)]

    first = subprocess.run(apply, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    patched = (target / "pretrain_gpt.py").read_text()
    added = [line for line in patched.splitlines() if line not in original.splitlines()]
    assert added == [line for line in added if line.startswith("import megatron_swiftmoe.megatron_lm")] and len(added) == 1

    again = subprocess.run(apply, capture_output=True, text=True)
    assert again.returncode == 0 and "already patched" in again.stdout
    assert (target / "pretrain_gpt.py").read_text() == patched

    revert = subprocess.run([*apply, "--revert"], capture_output=True, text=True)
    assert revert.returncode == 0, revert.stderr
    assert (target / "pretrain_gpt.py").read_text() == original

    wrong = subprocess.run([apply[0], apply[1], str(tmp_path)], capture_output=True, text=True)
    assert wrong.returncode == 1 and "not a Megatron-LM checkout" in wrong.stderr

    info = target / "megatron" / "core" / "package_info.py"
    info.write_text(info.read_text().replace("MINOR = ", "MINOR = 1", 1))  # 0.16 -> 0.116, 0.19 -> 0.119
    unknown = subprocess.run(apply, capture_output=True, text=True)
    assert unknown.returncode == 1 and "0.11" in unknown.stderr and "supports" in unknown.stderr
    assert (target / "pretrain_gpt.py").read_text() == original


# ---------------------------------------------------------------- flags and validation


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--use-torch-fsdp2"], "--use-torch-fsdp2 True is not supported"),
        (["--swiftmoe-slots-per-rank", "1"], "--swiftmoe-slots-per-rank 1 x 2 data-parallel ranks = 2 slots"),
        (["--optimizer", "sgd"], "--optimizer 'sgd' is not supported"),
    ],
)
def test_unsupported_settings_fail_before_any_process_group(tree, flags, message):
    # One process with WORLD_SIZE=2: Megatron validates its arguments before it initialises
    # torch.distributed, so reaching the message proves no process group was needed.
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{REPO}", "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    command = [sys.executable, "pretrain_gpt.py", *tiny_moe(), "--swiftmoe", "--swiftmoe-slots-per-rank", "3", *flags]
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert message in done.stdout, done.stdout[-3000:]
    assert "initializing torch distributed" not in done.stdout


# ---------------------------------------------------------------- training


def test_trains_on_mock_data_with_load_lines(tree):
    run = assert_ok(launch(tree, 2, *tiny_moe(**{"train-iters": 12, "lr": 3e-3}), *SWIFTMOE))
    losses = run.losses
    assert sorted(losses) == list(range(1, 13))
    assert losses[12] < losses[1] - 0.3, losses
    assert len(run.load_lines) == 12 * 2  # every iteration, both MoE layers
    assert "max/mean rank load" in run.load_lines[0] and "static EP" in run.load_lines[0]


@pytest.mark.one_version
def test_trains_on_an_indexed_dataset_on_three_ranks(tree, tmp_path):
    from megatron_swiftmoe.training.data import prepare_default_data

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]
    prefix, model = prepare_default_data(tmp_path / "data", vocab_size=512, corpus_files=files)
    data = ["--data-path", str(prefix), "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(model),
            "--split", "95,5,0"]
    flags = tiny_moe(num_experts=6, **{"train-iters": 16, "lr": 3e-3, "tokenizer-type": None, "vocab-size": None,
                                         "split": None})
    flags.remove("--mock-data")
    run = assert_ok(launch(tree, 3, *flags, *data, "--swiftmoe", "--swiftmoe-slots-per-rank", "2"))
    losses = run.losses
    assert sorted(losses) == list(range(1, 17))
    assert sum(losses[i] for i in range(13, 17)) / 4 < sum(losses[i] for i in range(1, 5)) / 4 - 0.5, losses
    assert run.load_lines


# ---------------------------------------------------------------- exactness against Megatron's static MoE


@pytest.fixture(scope="module")
def initial_checkpoint(tree, tmp_path_factory) -> Path:
    """One static-EP-1 iteration saved in torch_dist: every compared run starts from its weights
    (``--finetune``), whatever each layout's own initialisation would draw."""
    path = tmp_path_factory.mktemp("init")
    assert_ok(launch(tree, 2, *tiny_moe(num_experts=6, **{"train-iters": 1}), "--ckpt-format", "torch_dist",
                     "--save", str(path), "--save-interval", "1"))
    return path


# CI's second environment (megatron-core 0.19) runs the distributed optimizer here, and the plain
# one in the tests below; the legacy torch format's resume runs with 0.16 only.
@pytest.mark.parametrize("optimizer", [
    pytest.param([], id="plain", marks=pytest.mark.one_version),
    pytest.param(["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"], id="distributed"),
])
def test_swiftmoe_equals_static_expert_parallelism(tree, initial_checkpoint, optimizer):
    start = ["--load", str(initial_checkpoint), "--finetune", "--ckpt-format", "torch_dist", *optimizer]
    flags = tiny_moe(num_experts=6, **{"train-iters": 6})
    swift = assert_ok(launch(tree, 2, *flags, *start, *SWIFTMOE), "swiftmoe").losses
    ep1 = assert_ok(launch(tree, 2, *flags, *start), "static EP 1").losses
    ep2 = assert_ok(launch(tree, 2, *flags, *start, "--expert-model-parallel-size", "2"), "static EP 2").losses
    assert sorted(swift) == list(range(1, 7))
    assert_losses_close(swift, ep1)
    assert_losses_close(swift, ep2)


def test_swiftmoe_equals_static_with_dropout(tree, initial_checkpoint):
    """Megatron's default dropout (0.1): building SwiftMoE layers leaves the generators where the
    static experts leave them, so both draw the same masks."""
    start = ["--load", str(initial_checkpoint), "--finetune", "--ckpt-format", "torch_dist"]
    flags = tiny_moe(num_experts=6, **{"train-iters": 4, "hidden-dropout": 0.1, "attention-dropout": 0.1})
    swift = assert_ok(launch(tree, 2, *flags, *start, *SWIFTMOE), "swiftmoe").losses
    static = assert_ok(launch(tree, 2, *flags, *start), "static EP 1").losses
    assert_losses_close(swift, static)


@pytest.mark.one_version
def test_swiftmoe_equals_static_on_three_ranks(tree, initial_checkpoint):
    """Without an aux loss too (Megatron's MoE metric tracker then starts empty, on the CPU)."""
    start = ["--load", str(initial_checkpoint), "--finetune", "--ckpt-format", "torch_dist"]
    flags = tiny_moe(num_experts=6, **{"train-iters": 4, "moe-aux-loss-coeff": 0})
    swift = assert_ok(launch(tree, 3, *flags, *start, "--swiftmoe", "--swiftmoe-slots-per-rank", "4")).losses
    static = assert_ok(launch(tree, 3, *flags, *start, "--expert-model-parallel-size", "3")).losses
    assert_losses_close(swift, static)


def test_pipeline_parallel_swiftmoe_equals_static(tree, initial_checkpoint):
    """PP 2 x DP 2: each stage's MoE layer replicates over that stage's two data-parallel ranks."""
    start = ["--load", str(initial_checkpoint), "--finetune", "--ckpt-format", "torch_dist",
             "--pipeline-model-parallel-size", "2", "--use-distributed-optimizer"]
    flags = tiny_moe(num_experts=6, **{"train-iters": 4})
    swift = assert_ok(launch(tree, 4, *flags, *start, "--swiftmoe", "--swiftmoe-slots-per-rank", "4"), "swiftmoe")
    ep1 = assert_ok(launch(tree, 4, *flags, *start), "static EP 1").losses
    ep2 = assert_ok(launch(tree, 4, *flags, *start, "--expert-model-parallel-size", "2"), "static EP 2").losses
    assert sorted(swift.losses) == list(range(1, 5))
    assert_losses_close(swift.losses, ep1)
    assert_losses_close(swift.losses, ep2)
    assert {line.split("|")[0].strip() for line in swift.load_lines} == {"moe layer  0", "moe layer  1"}  # both stages


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("ckpt_format", [pytest.param("torch", marks=pytest.mark.one_version), "torch_dist"])
@pytest.mark.parametrize("pipeline", [pytest.param(1, id="dp2"), pytest.param(2, id="pp2xdp2", marks=pytest.mark.one_version)])
def test_resume_equals_uninterrupted_run(tree, tmp_path, ckpt_format, pipeline):
    flags = [*tiny_moe(num_experts=6), *SWIFTMOE, "--use-distributed-optimizer", "--bf16", "--ckpt-format", ckpt_format,
             "--pipeline-model-parallel-size", str(pipeline)]
    ranks = 2 * pipeline
    full = assert_ok(launch(tree, ranks, *flags), "uninterrupted").losses
    save = ["--save", str(tmp_path / "ckpt"), "--save-interval", "3"]
    first = assert_ok(launch(tree, ranks, *flags, *save, "--exit-interval", "3"), "first half").losses
    resumed_run = assert_ok(launch(tree, ranks, *flags, "--load", str(tmp_path / "ckpt")), "resumed")
    # bf16 model, fp32 masters: the same computation in the same order, so equal to the printed
    # digits; the resumed run's second iteration is recovered from a mean (PRINTED_ABS).
    joined = {**first, **resumed_run.losses}
    assert joined.keys() == full.keys()
    for iteration, loss in joined.items():
        exact = iteration != resumed_run.unaveraged
        assert loss == full[iteration] if exact else math.isclose(loss, full[iteration], abs_tol=PRINTED_ABS), (
            iteration, joined, full)
    if pipeline > 1:
        return
    keep = assert_ok(launch(tree, ranks, *flags, "--load", str(tmp_path / "ckpt"), "--no-load-optim", "--no-load-rng"),
                     "--no-load-optim").losses
    assert keep[4] == full[4]  # weights (experts included) kept; Adam restarts from zero moments
    assert keep[5] != full[5]


def test_torch_dist_checkpoint_reshards_to_other_ranks_and_slots(tree, tmp_path):
    flags = [*tiny_moe(num_experts=6), "--ckpt-format", "torch_dist", "--swiftmoe"]
    assert_ok(launch(tree, 2, *flags, "--swiftmoe-slots-per-rank", "3", "--save", str(tmp_path / "ckpt"),
                     "--save-interval", "3", "--exit-interval", "3"), "2 ranks")
    first_resumed = {}
    for ranks, slots in [(2, 3), (3, 2), (3, 4)]:  # (2, 3) is the saving layout: the reference
        resumed = assert_ok(launch(tree, ranks, *flags, "--swiftmoe-slots-per-rank", str(slots),
                                   "--load", str(tmp_path / "ckpt"), "--exit-interval", "4"), f"{ranks}x{slots}")
        first_resumed[ranks, slots] = resumed.losses[4]
    for layout, loss in first_resumed.items():
        assert math.isclose(loss, first_resumed[2, 3], rel_tol=RTOL), first_resumed


@pytest.mark.one_version
def test_static_checkpoint_starts_swiftmoe_and_back(tree, tmp_path):
    flags = [*tiny_moe(num_experts=6), "--ckpt-format", "torch_dist", "--save-interval", "3", "--exit-interval", "3"]
    resume = ["--no-load-optim", "--exit-interval", "4"]
    assert_ok(launch(tree, 2, *flags, "--save", str(tmp_path / "static")))
    assert_ok(launch(tree, 2, *flags, *SWIFTMOE, "--save", str(tmp_path / "swift")))
    for source in ("static", "swift"):
        load = ["--load", str(tmp_path / source)]
        as_static = assert_ok(launch(tree, 2, *tiny_moe(num_experts=6), *load, *resume, "--ckpt-format", "torch_dist"))
        as_swift = assert_ok(launch(tree, 2, *tiny_moe(num_experts=6), *load, *resume, "--ckpt-format", "torch_dist",
                                    *SWIFTMOE))
        assert math.isclose(as_swift.losses[4], as_static.losses[4], rel_tol=RTOL), source


@pytest.mark.one_version
def test_damaged_torch_format_state_stops_every_rank_naming_the_file(tree, tmp_path):
    flags = [*tiny_moe(num_experts=6), *SWIFTMOE, "--ckpt-format", "torch"]
    assert_ok(launch(tree, 2, *flags, "--save", str(tmp_path / "ckpt"), "--save-interval", "3", "--exit-interval", "3"))
    damaged = tmp_path / "ckpt" / "iter_0000003" / "swiftmoe" / "pp000_dp00001.pt"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    run = launch(tree, 2, *flags, "--load", str(tmp_path / "ckpt"), timeout=300)
    assert run.returncode != 0
    assert "pp000_dp00001.pt (pipeline rank 0, data-parallel rank 1) does not match its checksum" in run.output


# ---------------------------------------------------------------- the unmodified Mixtral launch script


TORCHRUN_STAND_IN = '''\
#!{python}
"""torchrun for tests: runs the Mixtral example's command shrunk to CPU ranks, with --swiftmoe."""
import os, sys

SHRINK = {{"--num-layers": "4", "--hidden-size": "64", "--ffn-hidden-size": "128", "--num-attention-heads": "4",
          "--num-query-groups": "2", "--seq-length": "32", "--max-position-embeddings": "64",
          "--global-batch-size": "8", "--train-iters": "4", "--lr-decay-iters": "4", "--lr-warmup-iters": "1",
          "--save-interval": "2", "--eval-interval": "1000", "--eval-iters": "0",
          "--pipeline-model-parallel-size": "{pipeline}", "--nproc_per_node": "{nproc}"}}
DROP = {{"--nnodes", "--node_rank", "--master_addr", "--master_port", "--tokenizer-type", "--tokenizer-model",
        "--data-path"}}
args, out, i = sys.argv[1:], [], 0
while i < len(args):
    flag = args[i]
    if flag in DROP:
        i += 2
        continue
    out.append(flag)
    if flag in SHRINK:
        out.append(SHRINK[flag])
        i += 2
        continue
    i += 1
script = out.index("pretrain_gpt.py")
launcher = ["--standalone", *out[:script]]
extra = {cpu} + ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "512",
                 "--swiftmoe", "--swiftmoe-slots-per-rank", "{slots}"]
os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", *launcher, *out[script:], *extra])
'''


def test_unmodified_mixtral_example_trains_and_saves(tree, tmp_path):
    from tests.megatron_lm import CPU_FLAGS, environment

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in = bin_dir / "torchrun"
    # The script's own PP 4 fits 4 CPU ranks (data-parallel size 1: 8 slots for the 8 experts).
    stand_in.write_text(TORCHRUN_STAND_IN.format(python=sys.executable, pipeline=4, nproc=4, slots=8, cpu=CPU_FLAGS))
    stand_in.chmod(0o755)
    script = tree / "examples" / "mixtral" / "train_mixtral_8x7b_distributed.sh"
    env = {**environment(tree), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    ckpt = tmp_path / "ckpt"
    done = subprocess.run(["bash", str(script), str(ckpt), "unused.model", "unused-data"], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert "--expert-model-parallel-size 8 replaced by 1" in output
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert (ckpt / "iter_0000002").is_dir() and (ckpt / "iter_0000004").is_dir()
    assert " moe layer " in output
