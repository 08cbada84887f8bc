"""scripts/reproduce_paper.py: the table logic on synthetic metrics files (no training)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.one_version  # not version-dependent: CI's first environment only

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "reproduce_paper.py"


@pytest.fixture(scope="module")
def rp():
    spec = importlib.util.spec_from_file_location("reproduce_paper", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce_paper"] = module  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


def record(iteration: int, loss: float, kept: list[int], dropped: int = 0, time_s: float = 0.5,
           ranks: tuple[int, int] = (60, 40), migration: int = 0) -> dict:
    """One metrics line as pretrain_gpt writes it (two MoE layers, 4 experts, 2 ranks)."""
    layer = dict(tokens_per_expert=kept, replicas_per_expert=[1, 1, 1, 1], tokens_per_rank=list(ranks),
                 static_tokens_per_rank=list(ranks), dropped_tokens=dropped, tokens_sent=0)
    return dict(iteration=iteration, lm_loss=loss, iter_time_s=time_s, tokens_per_s=1.0,
                bytes_sent=dict(expert_migration=migration), layers=[layer, dict(layer)])


def write_run(report_dir: Path, name: str, losses: list[float], dropped: int = 0, exit_code: int | None = 0,
              stderr: str = "", time_s: float = 0.5) -> None:
    run_dir = report_dir / "runs" / name
    run_dir.mkdir(parents=True)
    kept = [40, 30, 20, 10]  # 100 computed pairs per layer
    lines = [json.dumps(record(i + 1, loss, kept, dropped, time_s)) for i, loss in enumerate(losses)]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if exit_code is not None:
        (run_dir / "exit_code").write_text(f"{exit_code}\n")
    if stderr:
        (run_dir / "train.err").write_text(stderr)


def linear(start: float, end: float, n: int) -> list[float]:
    return [start + (end - start) * i / (n - 1) for i in range(n)]


#: Simulated ms per iteration, per strategy and cluster (instead of the simulator).
FAKE_MS = {"megatron": 200.0, "deepspeed": 100.0, "flexmoe-50": 120.0, "flexmoe-100": 110.0, "swiftmoe": 90.0}


def fake_simulate(path, strategy, cluster):
    scale = 1.0 if cluster == "paper-a100-16" else 0.25
    return {"time_ms": FAKE_MS[strategy] * scale}


@pytest.fixture
def report_dir(tmp_path) -> Path:
    n = 101
    write_run(tmp_path, "megatron", linear(10.0, 5.0, n))                   # min 5.0, dropless
    write_run(tmp_path, "deepspeed", linear(10.0, 6.02, n), dropped=100)    # min 6.02 -> target 6.05; 50% dropped
    write_run(tmp_path, "flexmoe-100", linear(10.0, 5.5, n), dropped=25)    # 20% dropped
    write_run(tmp_path, "flexmoe-50", linear(10.0, 5.2, n), dropped=25)
    write_run(tmp_path, "flexmoe-10", linear(10.0, 9.0, 7), exit_code=1,
              stderr="Traceback (most recent call last):\nRuntimeError: boom in rank 1\n")
    write_run(tmp_path, "swiftmoe", linear(10.0, 4.0, n), dropped=0)
    return tmp_path


def first_at_or_below(losses: list[float], target: float) -> int:
    return next(i + 1 for i, v in enumerate(losses) if v <= target + 1e-12)


def test_smoothing_is_a_trailing_moving_average(rp):
    assert rp.smooth([4.0, 2.0, 6.0, 0.0], 2) == [4.0, 3.0, 4.0, 3.0]
    assert rp.smooth([1.0, 2.0, 3.0], 1) == [1.0, 2.0, 3.0]
    assert rp.smooth([3.0, 1.0, 2.0], 10) == [3.0, 2.0, 2.0]
    with pytest.raises(ValueError):
        rp.smooth([1.0], 0)


def test_target_is_the_worst_runs_best_loss_rounded_up(rp):
    assert rp.choose_target({"a": [5.0, 4.01], "b": [4.0, 3.0]}, 0.05) == pytest.approx(4.05)
    assert rp.choose_target({"a": [5.0, 4.05], "b": [3.0]}, 0.05) == pytest.approx(4.05)  # exact multiple kept
    assert rp.choose_target({"a": [4.0123], "b": [3.0]}, 0) == pytest.approx(4.0123)
    with pytest.raises(ValueError):
        rp.choose_target({}, 0.05)
    assert rp.iterations_to_target([1, 2, 3, 4], [5.0, 4.1, 4.0, 3.9], 4.0) == 3
    assert rp.iterations_to_target([1, 2], [5.0, 4.1], 4.0) is None


def test_table_from_synthetic_runs(rp, report_dir):
    runs = rp.load_runs(report_dir, rp.STRATEGIES)
    assert {k: r.status for k, r in runs.items()} == {
        "megatron": "ok", "deepspeed": "ok", "flexmoe-100": "ok", "flexmoe-50": "ok", "flexmoe-10": "failed",
        "swiftmoe": "ok", "swiftmoe-dropless": "missing"}
    assert "boom in rank 1" in runs["flexmoe-10"].error

    table = rp.build_table(runs, smooth_window=1, warmup=5, simulate=fake_simulate,
                           clusters=["paper-a100-16", "h100-16"])
    # Target: the worst run's best loss (deepspeed, 6.02) rounded up to 0.05; failed runs take no part.
    assert table.target == pytest.approx(6.05)
    assert "deepspeed" in table.target_rule

    n = 101
    expected_iters = {
        "megatron": first_at_or_below(linear(10.0, 5.0, n), 6.05),
        "deepspeed": first_at_or_below(linear(10.0, 6.02, n), 6.05),
        "flexmoe-100": first_at_or_below(linear(10.0, 5.5, n), 6.05),
        "flexmoe-50": first_at_or_below(linear(10.0, 5.2, n), 6.05),
        "swiftmoe": first_at_or_below(linear(10.0, 4.0, n), 6.05),
    }
    for name, iters in expected_iters.items():
        row = table.row(name)
        assert row["status"] == "ok"
        assert row["iters_to_target"] == iters, name
        assert row["cpu_s_per_iter"] == pytest.approx(0.5)
        a100 = row["sim"]["paper-a100-16"]
        assert a100["ms_per_iter"] == FAKE_MS[name]
        assert a100["min_to_target"] == pytest.approx(iters * FAKE_MS[name] / 60000)
        assert row["sim"]["h100-16"]["min_to_target"] == pytest.approx(iters * FAKE_MS[name] * 0.25 / 60000)
    assert expected_iters["deepspeed"] == n  # reached only at its very end, by construction

    # Tokens dropped: 100 computed + 100 dropped per layer -> 50 %; 100 + 25 -> 20 %.
    assert table.row("deepspeed")["dropped_pct"] == pytest.approx(50.0)
    assert table.row("flexmoe-50")["dropped_pct"] == pytest.approx(20.0)
    assert table.row("swiftmoe")["dropped_pct"] == 0.0

    # Speedups: minutes to target of deepspeed / of the best FlexMoE over this row's.
    minutes = {k: expected_iters[k] * FAKE_MS[k] for k in expected_iters}
    best_flex = min(minutes["flexmoe-100"], minutes["flexmoe-50"])
    for cluster in ("paper-a100-16", "h100-16"):
        swift = table.row("swiftmoe")["sim"][cluster]
        assert swift["speedup_vs_deepspeed"] == pytest.approx(minutes["deepspeed"] / minutes["swiftmoe"])
        assert swift["speedup_vs_best_flexmoe"] == pytest.approx(best_flex / minutes["swiftmoe"])
        assert table.row("deepspeed")["sim"][cluster]["speedup_vs_deepspeed"] == pytest.approx(1.0)
    assert table.row("swiftmoe")["sim"]["paper-a100-16"]["speedup_vs_deepspeed"] > 1

    # Failed / missing rows are marked, with no numbers.
    failed = table.row("flexmoe-10")
    assert failed["status"] == "failed" and "iters_to_target" not in failed
    assert table.row("swiftmoe-dropless")["status"] == "missing"
    text = rp.format_table(table)
    rows = {l.split()[0]: l.split()[1:] for l in text.splitlines()[2:] if l.split() and l.split()[0] in rp.STRATEGIES}
    assert rows["flexmoe-10"][:3] == ["failed", "(7", "it)"] and set(rows["flexmoe-10"][3:]) == {"-"}
    assert rows["swiftmoe-dropless"][0] == "missing"
    assert rows["swiftmoe"][:2] == ["ok", str(expected_iters["swiftmoe"])]
    assert "target loss 6.05" in text


def test_simulator_failure_marks_the_cell_not_the_run(rp, report_dir):
    def broken(path, strategy, cluster):
        if strategy == "swiftmoe":
            raise ValueError("no such cluster today")
        return fake_simulate(path, strategy, cluster)

    runs = rp.load_runs(report_dir, ["deepspeed", "swiftmoe"])
    table = rp.build_table(runs, smooth_window=1, simulate=broken, clusters=["paper-a100-16"])
    row = table.row("swiftmoe")
    assert row["status"] == "ok" and row["iters_to_target"] is not None
    assert "error" in row["sim"]["paper-a100-16"] and row["sim"]["paper-a100-16"]["speedup_vs_deepspeed"] is None
    assert any("no such cluster today" in note for note in table.notes)
    assert "n/a" in rp.format_table(table)


def test_given_target_and_unreached_target(rp, report_dir):
    runs = rp.load_runs(report_dir, ["deepspeed", "swiftmoe"])
    table = rp.build_table(runs, smooth_window=1, target=4.5, simulate=fake_simulate, clusters=["paper-a100-16"])
    assert table.row("deepspeed")["iters_to_target"] is None  # never below 6.02
    assert table.row("deepspeed")["sim"]["paper-a100-16"].get("min_to_target") is None
    assert table.row("swiftmoe")["sim"]["paper-a100-16"]["speedup_vs_deepspeed"] is None
    assert "not reached" in rp.format_table(table)


def test_report_files_are_written(rp, report_dir):
    runs = rp.load_runs(report_dir, rp.STRATEGIES)
    table = rp.build_table(runs, smooth_window=5, simulate=fake_simulate, clusters=["paper-a100-16", "h100-16"])
    paths = rp.write_report(table, report_dir, {"model": "synthetic"})
    report = paths["report"].read_text()
    assert paths["report"] == report_dir / "report.md"
    for text in ("| swiftmoe | ok |", "flexmoe-10 (failed)", "boom in rank 1", "Target loss", "Differences from the paper"):
        assert text in report, text
    png = report_dir / "loss_curves.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((report_dir / "table.json").read_text())
    assert data["target"] == pytest.approx(table.target)
    assert [r["strategy"] for r in data["rows"]] == list(rp.STRATEGIES)


def test_reuse_command_line_makes_the_table_without_training(rp, report_dir, capsys):
    assert rp.main(["--reuse", "--no-sim", "--report-dir", str(report_dir), "--smooth-window", "1"]) == 0
    out = capsys.readouterr().out
    assert "flexmoe-10 failed" in out and "boom in rank 1" in out
    assert "target loss 6.05" in out
    assert (report_dir / "report.md").is_file() and (report_dir / "loss_curves.png").is_file()


def test_simulator_on_a_synthetic_trace(rp, tmp_path):
    """The real simulator on a tiny 16-expert trace (the CPU runs' expert count)."""
    pytest.importorskip("megatron_swiftmoe.sim")
    lines = []
    for i in range(1, 6):
        tokens = [1024 - 15 * 8] + [8] * 15  # one hot expert
        layer = dict(tokens_per_expert=tokens, replicas_per_expert=[1] * 16, tokens_per_rank=[1024, 1024],
                     static_tokens_per_rank=[1024, 1024], dropped_tokens=0, tokens_sent=0)
        lines.append(json.dumps(dict(iteration=i, lm_loss=5.0, iter_time_s=0.3, layers=[layer])))
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(lines) + "\n")
    results = {s: rp.simulate_run(path, s, "paper-a100-16") for s in ("megatron", "deepspeed", "swiftmoe-dropless")}
    for name, sim in results.items():
        assert math.isfinite(sim["time_ms"]) and sim["time_ms"] > 0, name
    assert results["deepspeed"]["survival"] < 1.0 <= results["swiftmoe-dropless"]["survival"] + 1e-9
    big = rp.simulate_run(path, "swiftmoe", "h100-64")  # batch 64 < 64 GPUs x micro-batch 4: raised
    assert "raised" in big["note"]


def test_strategy_flags(rp):
    assert rp.strategy_flags("megatron") == ["--no-swiftmoe"]
    assert rp.strategy_flags("deepspeed") == ["--no-swiftmoe", "--moe-expert-capacity-factor", "1.0"]
    assert rp.strategy_flags("swiftmoe-dropless") == ["--swiftmoe"]
    assert rp.strategy_flags("flexmoe-7") == [
        "--swiftmoe", "--swiftmoe-replan-interval", "7", "--moe-expert-capacity-factor", "1.0"]
    assert rp.sim_strategy("swiftmoe") == ("swiftmoe", 1.0)
    assert rp.sim_strategy("swiftmoe-dropless") == ("swiftmoe", None)
    assert rp.sim_strategy("megatron") == ("static", None)
    assert rp.sim_strategy("flexmoe-7") == ("flexmoe-7", None)
    for bad in ("flexmoe-0", "flexmoe-x", "tutel"):
        with pytest.raises(ValueError):
            rp.strategy_flags(bad)
