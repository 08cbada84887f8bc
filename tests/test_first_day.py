"""What a new user meets first: the module names the README uses, patches/apply.sh's arguments in
either order, and the quickstart script itself (short runs, each in its own directory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.megatron_lm import REPO, TREES, missing_reason, source_tree

pytestmark = pytest.mark.one_version  # not version-dependent: CI's first environment only


def test_readme_module_names_import():
    from megatron_swiftmoe.placement import load_counts, place  # noqa: F401

    import megatron_swiftmoe
    import megatron_swiftmoe.compat
    import megatron_swiftmoe.core.compat
    import megatron_swiftmoe.core.placement
    import megatron_swiftmoe.placement

    assert megatron_swiftmoe.placement is megatron_swiftmoe.core.placement  # one module, two names
    assert megatron_swiftmoe.compat is megatron_swiftmoe.core.compat
    assert place is megatron_swiftmoe.core.placement.place and callable(megatron_swiftmoe.compat.apply)


def test_help_says_the_metrics_file_is_written_every_iteration():
    from megatron_swiftmoe.training.arguments import build_parser

    assert "one line per iteration" in " ".join(build_parser().format_help().split())


def test_apply_sh_takes_revert_before_or_after_the_folder(tmp_path):
    if missing := missing_reason(TREES[0]):
        pytest.skip(missing)
    tree = tmp_path / "Megatron-LM"  # the two files apply.sh reads and patches
    (tree / "megatron" / "core").mkdir(parents=True)
    for name in ("pretrain_gpt.py", "megatron/core/package_info.py"):
        (tree / name).write_text((source_tree(TREES[0]) / name).read_text())
    original = (tree / "pretrain_gpt.py").read_text()
    apply = ["bash", str(REPO / "patches" / "apply.sh")]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*apply, *args], capture_output=True, text=True)

    for revert_first in (True, False):
        assert run(str(tree)).returncode == 0
        assert (tree / "pretrain_gpt.py").read_text() != original
        reverted = run("--revert", str(tree)) if revert_first else run(str(tree), "--revert")
        assert reverted.returncode == 0 and "reverted" in reverted.stdout, reverted.stderr
        assert (tree / "pretrain_gpt.py").read_text() == original
    unknown = run("--undo", str(tree))
    assert unknown.returncode == 2 and "unknown option --undo" in unknown.stderr
    two = run(str(tree), str(tmp_path))
    assert two.returncode == 2 and "one Megatron-LM folder" in two.stderr


def quickstart(runs: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SWIFTMOE_PYTHON": sys.executable, "QUICKSTART_RUNS": str(runs), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(REPO / "scripts" / "quickstart.sh"), *flags], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def test_short_quickstart_runs_each_write_their_own_directory_and_plot(tmp_path):
    short = ["--train-iters", "6", "--mock-data", "--eval-iters", "0", "--log-interval", "3", "--no-progress"]
    swift = quickstart(tmp_path, *short)
    static = quickstart(tmp_path, *short, "--no-swiftmoe")
    # The config's 30 warm-up iterations do not fit 6: scaled to its fraction (10%), with a notice.
    assert "the config's lr-warmup-iters (30 of its 300 train-iters) scaled to 1" in swift.stdout
    directories = {path.name.rsplit("-", 1)[1]: path for path in tmp_path.iterdir() if not path.is_symlink()}
    assert sorted(directories) == ["static", "swiftmoe"]
    assert (tmp_path / "latest").resolve() == directories["static"].resolve()
    for strategy, done in (("swiftmoe", swift), ("static", static)):
        run_dir = directories[strategy]
        assert f"run directory: {run_dir}" in done.stdout
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["iteration"] for r in records] == list(range(1, 7))
        replicas = [r["layers"][0]["replicas_per_expert"] for r in records]
        assert all(sum(r) == (12 if strategy == "swiftmoe" else 8) for r in replicas)  # 2 x 6 slots; 8 experts
        assert (run_dir / "swiftmoe_load.png").stat().st_size > 10_000
        assert "layer 1: mean max/mean rank load" in done.stdout  # both MoE layers plotted


def test_missing_data_path_files_are_named_before_any_process_group(tmp_path, capsys):
    import importlib.util
    from types import SimpleNamespace

    from megatron_swiftmoe.training.arguments import parse_args

    with pytest.raises(SystemExit):  # the trainer (parse_args runs before any process group)
        parse_args(["--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--data-path", str(tmp_path / "corpus"),
                    "--tokenizer-model", str(REPO / "README.md")], world_size=2)
    assert f"--data-path {tmp_path / 'corpus'}: no {tmp_path / 'corpus'}.bin or {tmp_path / 'corpus'}.idx" in (
        capsys.readouterr().err)
    # The Megatron-LM plugin's check (megatron_lm/startup.py, loaded alone: the package would bind
    # itself into Megatron-LM): blends, weights, other splits; mock data needs no files.
    spec = importlib.util.spec_from_file_location("startup", REPO / "megatron_swiftmoe" / "megatron_lm" / "startup.py")
    startup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(startup)
    (tmp_path / "a.bin").write_bytes(b"")
    (tmp_path / "a.idx").write_bytes(b"")
    (tmp_path / "b.bin").write_bytes(b"")
    a, b, c = (str(tmp_path / name) for name in "abc")
    args = SimpleNamespace(mock_data=False, data_path=["0.7", a, "0.3", b], train_data_path=None,
                           valid_data_path=[c], test_data_path=None)
    assert startup.missing_data_paths(args) == [b, c]
    assert startup.missing_data_paths(SimpleNamespace(mock_data=True, data_path=[c])) == []
