"""Running a Megatron-LM checkout's own ``pretrain_gpt.py`` (patched) in tests, on CPU ranks.

The checkouts are ``../shared/megatron-lm/core_v0.16.1`` and ``core_v0.19.0`` (or
``$MEGATRON_LM_DIR`` instead of both), each copied into a temporary folder and patched with
``patches/apply.sh`` (the original is never written). A tree runs in the environment whose
megatron-core has its version: ``.ci/run`` has one for 0.16.1 and one for 0.19.2.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_TREES = REPO.parent / "shared" / "megatron-lm"
TIMEOUT_S = 600
#: Megatron prints losses as %E with six decimals (losses here are ~6: a 1e-6 step). A loss
#: recovered from a two-iteration mean combines two such roundings: off by up to 1.5e-6.
PRINTED_ABS = 2e-6

#: What a laptop run of Megatron-LM needs on CPU (README, "Use with Megatron-LM").
CPU_FLAGS = [
    "--distributed-backend", "gloo", "--transformer-impl", "local", "--no-gradient-accumulation-fusion",
    "--use-cpu-initialization", "--no-masked-softmax-fusion", "--no-bias-gelu-fusion",
    "--no-bias-dropout-fusion", "--no-rope-fusion", "--no-persist-layer-norm",
]


def tiny_moe(num_experts: int = 4, **overrides) -> list[str]:
    """A tiny GPT-MoE on mock data, dropout 0, one log line per iteration."""
    settings = {
        "num-layers": 2, "hidden-size": 64, "ffn-hidden-size": 128, "num-attention-heads": 4,
        "seq-length": 32, "max-position-embeddings": 32, "micro-batch-size": 2, "global-batch-size": 12,
        "train-iters": 6, "lr": 1e-3, "lr-decay-style": "constant", "num-experts": num_experts,
        "moe-router-topk": 2, "moe-aux-loss-coeff": 1e-2, "tokenizer-type": "NullTokenizer",
        "vocab-size": 512, "split": "98,2,0", "log-interval": 1, "eval-interval": 1000, "eval-iters": 0,
        "hidden-dropout": 0.0, "attention-dropout": 0.0, "seed": 1234,
    }
    settings.update(overrides)
    flags = ["--disable-bias-linear", "--mock-data"]
    for key, value in settings.items():
        if value is not None:
            flags += [f"--{key}", str(value)]
    return flags


TREES = ("core_v0.16.1", "core_v0.19.0")


def source_tree(tree: str) -> Path:
    return Path(os.environ.get("MEGATRON_LM_DIR") or SHARED_TREES / tree)


def missing_reason(tree: str) -> str | None:
    """Why there is no checkout of ``tree`` to test (None if there is one). CI sets
    SWIFTMOE_REQUIRE_MEGATRON_LM=1: there a missing checkout fails instead of skipping."""
    source = source_tree(tree)
    if (source / "pretrain_gpt.py").is_file():
        return None
    reason = (f"no Megatron-LM checkout at {source}: set MEGATRON_LM_DIR to a checkout of tag {tree}, "
              f"or run from a clone of this repository next to shared/")
    if os.environ.get("SWIFTMOE_REQUIRE_MEGATRON_LM") == "1":
        raise FileNotFoundError(reason)
    return reason


def skip_reason(tree: str) -> str | None:
    """Why ``tree`` cannot run here (None if it can): a checkout of it must exist, and its
    megatron-core generation must be the installed one, whose Python dependencies this
    environment has."""
    import megatron.core

    if missing := missing_reason(tree):
        return missing
    info = (source_tree(tree) / "megatron" / "core" / "package_info.py").read_text()
    wanted = ".".join(re.search(rf"^{key} = (\d+)", info, re.M).group(1) for key in ("MAJOR", "MINOR"))
    installed = ".".join(megatron.core.__version__.split(".")[:2])
    if wanted != installed:
        return f"{tree} (megatron-core {wanted}) runs in the megatron-core {wanted} environment; this one has {installed}"
    return None


def checkout(destination: Path, tree: str = "core_v0.16.1") -> Path:
    """A patched copy of the Megatron-LM checkout under test."""
    source = source_tree(tree)
    target = destination / source.name
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".git", "__pycache__"))
    for path in target.rglob("*"):
        if path.is_file():
            path.chmod(path.stat().st_mode | 0o200)
    subprocess.run(["bash", str(REPO / "patches" / "apply.sh"), str(target)], check=True, capture_output=True)
    return target


@dataclass
class Run:
    returncode: int
    output: str

    @property
    def losses(self) -> dict[int, float]:
        """Per-iteration lm loss from Megatron's log lines.

        Megatron does not reset its loss accumulator after a run's first logged iteration, so
        with ``--log-interval 1`` the second line shows the mean of the first two; undone here
        (that iteration is :attr:`unaveraged`: it is exact only to ``PRINTED_ABS``).
        """
        lines = re.findall(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.E+-]+)", self.output)
        losses = {int(i): float(v) for i, v in lines}
        if self.unaveraged in losses:
            losses[self.unaveraged] = 2 * losses[self.unaveraged] - losses[self.unaveraged - 1]
        return losses

    @property
    def unaveraged(self) -> int:
        """The iteration whose loss :attr:`losses` recovers from a two-iteration mean."""
        first = re.search(r"iteration\s+(\d+)/", self.output)
        return int(first.group(1)) + 1 if first else -1

    @property
    def load_lines(self) -> list[str]:
        # Not anchored at line starts: the ranks share one stdout, so another rank's output can
        # end up on the same line as a load line (once in CI, 23 of 24 started a line).
        return re.findall(r" moe layer +\d+ \| max/mean rank load[^\n]*", self.output)


def launch(tree: Path, nproc: int, *flags: str, timeout: int = TIMEOUT_S) -> Run:
    """``torchrun --standalone --nproc-per-node nproc pretrain_gpt.py CPU_FLAGS flags``."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
        "pretrain_gpt.py", *CPU_FLAGS, *flags,
    ]
    done = subprocess.run(command, cwd=tree, env=environment(tree), capture_output=True, text=True, timeout=timeout)
    return Run(done.returncode, done.stdout + done.stderr)


def environment(tree: Path) -> dict[str, str]:
    """The checkout first on the path (as when its scripts run), then this project."""
    path = os.pathsep.join([str(tree), str(REPO), os.environ.get("PYTHONPATH", "")])
    # CUDA_DEVICE_MAX_CONNECTIONS=1: Megatron requires it with tensor or context parallelism on
    # GPUs before Blackwell (the CPU counts as one), and its launch scripts set it.
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
            "CUDA_DEVICE_MAX_CONNECTIONS": "1"}


def assert_ok(run: Run, what: str = "run") -> Run:
    assert run.returncode == 0, f"{what} failed (rc {run.returncode}):\n{run.output[-6000:]}"
    return run


def grad_norms(run: Run) -> dict[int, float]:
    """Per-iteration grad norm from Megatron's log lines (printed with three decimals)."""
    lines = re.findall(r"iteration\s+(\d+)/\s*\d+ \|.*?grad norm: ([0-9.]+)", run.output)
    return {int(i): float(v) for i, v in lines}


def flag_list(settings: dict) -> list[str]:
    """``{"name": value}`` as Megatron-LM flags: ``True`` a bare flag, ``None`` left out, a list
    several values."""
    flags = []
    for name, value in settings.items():
        if value is None or value is False:
            continue
        flags.append(f"--{name}")
        if isinstance(value, (list, tuple)):
            flags += [str(v) for v in value]
        elif value is not True:
            flags.append(str(value))
    return flags
