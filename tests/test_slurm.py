"""The SLURM scripts (scripts/slurm/*.sbatch) run as SLURM runs them, on CPU ranks: stand-in
``srun`` / ``scontrol`` executables on PATH and the SLURM_* variables of a two-node allocation.
The stand-in srun starts its command once per node, in parallel, as srun does; each starts the
real torchrun, and the two torchruns meet in one c10d rendezvous on the first node (localhost),
so every job below really trains on 2 ranks that joined through the script's own launch line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.megatron_lm import CPU_FLAGS, REPO, Run, TREES, environment, skip_reason, source_tree, tiny_moe

pytestmark = pytest.mark.one_version  # not version-dependent: CI's first environment only

TIMEOUT_S = 600

SRUN = '''#!{python}
"""srun for tests: its command once per node (--nodes=N, else SLURM_NNODES), in parallel, with
SLURM_NODEID / SLURM_PROCID as on each node; options are recorded in $SRUN_LOG, not applied."""
import json, os, subprocess, sys


args = sys.argv[1:]
options = []
while args and args[0].startswith("-"):
    options.append(args.pop(0))
nodes = int(os.environ["SLURM_NNODES"])
for option in options:
    if option.startswith("--nodes="):
        nodes = int(option.split("=", 1)[1])
with open(os.environ["SRUN_LOG"], "a") as log:
    log.write(json.dumps({{"options": options, "command": args, "nodes": nodes}}) + "\\n")
procs = [subprocess.Popen(args, env={{**os.environ, "SLURM_NODEID": str(i), "SLURM_PROCID": str(i)}})
         for i in range(nodes)]
codes = [p.wait() for p in procs]
sys.exit(next((c for c in codes if c), 0))
'''

SCONTROL = '''#!/bin/bash
# scontrol for tests: "show hostnames LIST" names every node of the allocation localhost.
[ "$1 $2" = "show hostnames" ] || {{ echo "stand-in scontrol: unsupported: $*" >&2; exit 1; }}
for _ in $(seq "$SLURM_NNODES"); do echo localhost; done
'''

TORCHRUN = '''#!/bin/bash
exec {python} -m torch.distributed.run "$@"
'''


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sbatch(script: str, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[Run, list[dict]]:
    """Run ``scripts/slurm/<script>`` as the batch step of a 2-node, 1-GPU-per-node job submitted
    from the clone's root; returns the run and the stand-in srun's records."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("torchrun", TORCHRUN)):
        (bin_dir / name).write_text(text.format(python=sys.executable))
        (bin_dir / name).chmod(0o755)
    srun_log = tmp_path / "srun.jsonl"
    srun_log.unlink(missing_ok=True)
    job = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": script,
        "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_GPUS_ON_NODE": "1",
        "SLURM_SUBMIT_DIR": str(REPO), "MASTER_PORT": str(free_port()), "SRUN_LOG": str(srun_log),
        "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
    }
    done = subprocess.run(["bash", str(REPO / "scripts" / "slurm" / script), *args], cwd=REPO,
                          env={**(env or os.environ), **job}, capture_output=True, text=True, timeout=TIMEOUT_S)
    records = [json.loads(line) for line in srun_log.read_text().splitlines()] if srun_log.exists() else []
    return Run(done.returncode, done.stdout + done.stderr), records


def mounts(record: dict) -> set[str]:
    option = next(o for o in record["options"] if o.startswith("--container-mounts="))
    return {mount.split(":")[0] for mount in option.split("=", 1)[1].split(",")}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    """A small indexed dataset and its tokenizer, outside the clone (so it must be mounted)."""
    from megatron_swiftmoe.training.data import prepare_default_data

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:20]
    return prepare_default_data(tmp_path_factory.mktemp("data"), vocab_size=512, corpus_files=files)


def test_pretrain_gpt_sbatch_trains_on_two_nodes_in_a_container(tmp_path, dataset):
    prefix, tokenizer = dataset
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "metrics" / "metrics.jsonl"
    run, records = sbatch(
        "pretrain_gpt.sbatch", tmp_path, "configs/tiny_cpu.yaml", "--data-path", str(prefix), "--tokenizer-model",
        str(tokenizer), "--split", "95,5,0", "--train-iters", "4", "--eval-iters", "0", "--no-progress",
        "--save", str(ckpt), "--save-interval", "4", "--metrics-path", str(metrics),
        env={**os.environ, "CONTAINER": "registry.example/swiftmoe:test", "SWIFTMOE_VENV": sys.prefix},
    )
    assert run.returncode == 0, run.output[-6000:]
    assert "nodes=2 gpus/node=1 master=localhost:" in run.output
    assert "lr-warmup-iters (30 of its 300 train-iters) scaled to 0" in run.output  # the config's 30 vs 4
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [1, 2, 3, 4]
    assert all(len(r["layers"][0]["tokens_per_rank"]) == 2 for r in lines)  # one job of 2 ranks, one per node
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    (launch,) = records
    assert launch["nodes"] == 2 and "--ntasks-per-node=1" in launch["options"]
    assert "--container-image=registry.example/swiftmoe:test" in launch["options"]
    assert {str(REPO), str(prefix.parent), str(ckpt), str(metrics.parent)} <= mounts(launch)
    command = launch["command"][-1]
    assert "--rdzv-backend c10d" in command and "--nnodes 2" in command and "source " in command


@pytest.mark.parametrize("tree_name", TREES)
def test_megatron_lm_sbatch_trains_pretrain_gpt_with_swiftmoe(tmp_path, tree_name, patched_checkout):
    if reason := skip_reason(tree_name):
        pytest.skip(reason)
    env = environment(REPO)  # this project importable; the script starts in the checkout
    unpatched, _ = sbatch("megatron_lm.sbatch", tmp_path, "--swiftmoe",
                          env={**env, "MEGATRON_LM_DIR": str(source_tree(tree_name))})
    assert unpatched.returncode == 1 and "is not patched: run bash patches/apply.sh" in unpatched.output

    tree = patched_checkout(tree_name)
    ckpt = tmp_path / "ckpt"
    run, records = sbatch(
        "megatron_lm.sbatch", tmp_path, *CPU_FLAGS, *tiny_moe(**{"train-iters": 3}), "--save", str(ckpt),
        "--save-interval", "3", "--swiftmoe", "--swiftmoe-slots-per-rank", "3",
        env={**env, "MEGATRON_LM_DIR": str(tree)},
    )
    assert run.returncode == 0, run.output[-6000:]
    assert sorted(run.losses) == [1, 2, 3]
    assert "> SwiftMoE on: 2 MoE layers, 4 experts in 3 slots per rank x 2 data-parallel ranks" in run.output
    assert "Unknown MLP type" not in run.output
    assert len(run.load_lines) == 3 * 2
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    (launch,) = records
    assert launch["nodes"] == 2 and f"cd {tree}" in launch["command"][-1]


def test_reproduce_paper_sbatch_trains_and_writes_the_report(tmp_path):
    report = tmp_path / "report"
    run, records = sbatch(
        "reproduce_paper.sbatch", tmp_path, "--mock-data", "--eval-iters", "0",
        env={**os.environ, "CONFIG": "configs/tiny_cpu.yaml", "STRATEGIES": "megatron swiftmoe", "TRAIN_ITERS": "4",
             "SIM_ITERS": "4", "SMOOTH_WINDOW": "2", "REPORT_DIR": str(report)},
    )
    assert run.returncode == 0, run.output[-6000:]
    for strategy in ("megatron", "swiftmoe"):
        assert (report / "runs" / strategy / "exit_code").read_text().strip() == "0", run.output[-4000:]
        assert len((report / "runs" / strategy / "metrics.jsonl").read_text().splitlines()) == 4
    assert (report / "report.md").is_file()
    assert [r["nodes"] for r in records] == [2, 2]  # the table runs on the batch host without CONTAINER
